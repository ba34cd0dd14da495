// f16 tensors stored as u32-packed pairs (little-endian: element 2w in the low half of word w),
// widened to f32 on load; arithmetic in f32.
alias Elem = u32;

fn q_at(e: u32) -> f32 { return unpack2x16float(q[e >> 1u])[e & 1u]; }
fn k_at(e: u32) -> f32 { return unpack2x16float(k[e >> 1u])[e & 1u]; }
fn v_at(e: u32) -> f32 { return unpack2x16float(v[e >> 1u])[e & 1u]; }

// f32 -> f16 bits. pack2x16float is indeterminate for NaN and values beyond the f16 range, so
// those are written explicitly: NaN as a quiet NaN, overflow as a signed infinity.
fn f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return 0x7e00u;
    }
    if ((b & 0x7fffffffu) >= 0x477ff000u) { // |x| >= 65520 rounds to infinity
        return sign | 0x7c00u;
    }
    return pack2x16float(vec2<f32>(x, 0.0)) & 0xffffu;
}

// Store elements (e, e + 1) of `out`; e is even, so the pair is one word.
fn store_pair(e: u32, x: vec2<f32>) {
    out[e >> 1u] = f16_bits(x.x) | (f16_bits(x.y) << 16u);
}
