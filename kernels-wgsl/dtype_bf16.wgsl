// bf16 tensors stored as u32-packed pairs (element 2w in the low half of word w): a bf16 is the
// top half of an f32, so widening is a shift; arithmetic in f32.
alias Elem = u32;

fn bf16_at(word: u32, e: u32) -> f32 {
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (e & 1u) == 1u));
}

fn q_at(e: u32) -> f32 { return bf16_at(q[e >> 1u], e); }
fn k_at(e: u32) -> f32 { return bf16_at(k[e >> 1u], e); }
fn v_at(e: u32) -> f32 { return bf16_at(v[e >> 1u], e); }

// f32 -> bf16 bits, round to nearest even.
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// Store elements (e, e + 1) of `out`; e is even, so the pair is one word.
fn store_pair(e: u32, x: vec2<f32>) {
    out[e >> 1u] = bf16_bits(x.x) | (bf16_bits(x.y) << 16u);
}
