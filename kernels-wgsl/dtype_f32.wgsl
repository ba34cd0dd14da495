// f32 tensors: one element per word.
alias Elem = f32;

fn q_at(e: u32) -> f32 { return q[e]; }
fn k_at(e: u32) -> f32 { return k[e]; }
fn v_at(e: u32) -> f32 { return v[e]; }

// Store elements (e, e + 1) of `out`; e is even.
fn store_pair(e: u32, x: vec2<f32>) {
    out[e] = x.x;
    out[e + 1u] = x.y;
}
