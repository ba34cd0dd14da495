// f16 tensors stored as u32-packed pairs (little-endian: element 2w in the low half of word w),
// widened to f32 on load; arithmetic in f32.
alias Elem = u32;

fn q_at(e: u32) -> f32 { return unpack2x16float(q[e >> 1u])[e & 1u]; }
fn k_at(e: u32) -> f32 { return unpack2x16float(k[e >> 1u])[e & 1u]; }
fn v_at(e: u32) -> f32 { return unpack2x16float(v[e >> 1u])[e & 1u]; }

// Store elements (e, e + 1) of `out`; e is even, so the pair is one word.
fn store_pair(e: u32, x: vec2<f32>) {
    out[e >> 1u] = pack2x16float(x);
}
