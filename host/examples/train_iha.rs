//! Fit an IHA layer's mixing weights, collapse and head norm by gradient descent.
//!
//! A "teacher" IHA layer with random weights maps random inputs to targets; a "student" of the
//! same shape starts elsewhere and learns `aq, ak, av, r, gamma` from the mean squared error,
//! its gradients from `Backend::backward` (the forward's `lse` saved for it). Adam steps; the
//! loss printed every few steps falls.
//!
//! ```text
//! cargo run --release -p headmix --example train_iha -- [steps]
//! ```
//! Runs on the best backend that has a backward pass (else the CPU).

use headmix::backward::GradBuffers;
use headmix::timing::Owned;
use headmix::{Backend, BackwardIo, Config, DType, HeadNorm, Io, Problem, Rng, Tensor, TensorMut, Weights};

/// The layer and the data of the synthetic task.
pub struct Task {
    pub cfg: Config,
    pub batch: usize,
    pub n: usize,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub target: Vec<f32>,
}

impl Task {
    /// IHA with `H = 2`, `P = 2`, `d = 8`, causal, over `batch` sequences of `n` tokens; the
    /// targets are the teacher's outputs.
    pub fn new(backend: &dyn Backend, batch: usize, n: usize, seed: u64) -> headmix::Result<Task> {
        let cfg = Config::iha(2, 2, 8);
        let mut rng = Rng::new(seed);
        let len = batch * n * 2 * 8;
        let (q, k, v) = (rng.normal_vec(len, 1.0), rng.normal_vec(len, 1.0), rng.normal_vec(len, 1.0));
        let mut teacher = Weights::random(&cfg, seed ^ 1);
        teacher.norm = Some(HeadNorm::Rms { gamma: (0..2 * 8).map(|_| (1.0 + 0.3 * rng.normal()) as f32).collect() });
        let mut task = Task { cfg, batch, n, q, k, v, target: vec![] };
        task.target = task.forward(backend, &teacher)?.0;
        Ok(task)
    }

    fn shape(&self) -> [usize; 4] {
        [self.batch, self.n, self.cfg.heads, self.cfg.head_dim]
    }

    /// The layer's output and `lse`.
    pub fn forward(&self, backend: &dyn Backend, w: &Weights) -> headmix::Result<(Vec<f32>, Vec<f32>)> {
        let s = self.shape();
        let mut out = vec![0f32; self.q.len()];
        let mut lse = vec![0f32; self.batch * self.cfg.heads * self.n * self.cfg.pseudo];
        let io = Io {
            q: Tensor::new(&self.q, &s),
            k: Tensor::new(&self.k, &s),
            v: Tensor::new(&self.v, &s),
            out: TensorMut::new(&mut out, &s),
            lse: Some(&mut lse),
        };
        backend.forward(&self.cfg, w, io)?;
        Ok((out, lse))
    }

    /// Loss `mean((out - target)^2) / 2` and its gradients with respect to the weights.
    pub fn loss_and_grads(&self, backend: &dyn Backend, w: &Weights) -> headmix::Result<(f64, GradBuffers)> {
        let (out, lse) = self.forward(backend, w)?;
        let len = out.len() as f64;
        let loss = out.iter().zip(&self.target).map(|(o, t)| ((o - t) as f64).powi(2)).sum::<f64>() / (2.0 * len);
        let dout: Vec<f32> = out.iter().zip(&self.target).map(|(o, t)| ((o - t) as f64 / len) as f32).collect();
        let s = self.shape();
        let problem = Problem::new(&self.cfg, self.batch, self.n, self.n, DType::F32, w.r.is_some(), w.norm.is_some())?;
        let mut g = GradBuffers::new(&problem, w, f32::NAN);
        let (dq, dk, dv, dw) = g.outputs(&s, &s);
        let out_o = Owned::F32(out);
        let io = BackwardIo {
            q: Tensor::new(&self.q, &s),
            k: Tensor::new(&self.k, &s),
            v: Tensor::new(&self.v, &s),
            out: out_o.tensor(&s),
            lse: &lse,
            dout: Tensor::new(&dout, &s),
            dq,
            dk,
            dv,
            dw,
        };
        backend.backward(&self.cfg, w, io)?;
        Ok((loss, g))
    }
}

/// Adam on every weight of the layer.
struct Adam {
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    t: i32,
}

fn params(w: &mut Weights) -> Vec<&mut Vec<f32>> {
    let mut p = vec![&mut w.aq, &mut w.ak, &mut w.av];
    p.extend(w.r.as_mut());
    if let Some(HeadNorm::Rms { gamma } | HeadNorm::Group { gamma, .. }) = w.norm.as_mut() {
        p.push(gamma);
    }
    p
}

fn grads(g: &GradBuffers) -> Vec<&Vec<f32>> {
    let mut v = vec![&g.daq, &g.dak, &g.dav];
    v.extend(g.dr.as_ref());
    v.extend(g.dgamma.as_ref());
    v
}

impl Adam {
    fn step(&mut self, w: &mut Weights, g: &GradBuffers, lr: f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (i, (p, g)) in params(w).into_iter().zip(grads(g)).enumerate() {
            if self.m.len() <= i {
                self.m.push(vec![0.0; p.len()]);
                self.v.push(vec![0.0; p.len()]);
            }
            for j in 0..p.len() {
                let gj = g[j] as f64;
                self.m[i][j] = b1 * self.m[i][j] + (1.0 - b1) * gj;
                self.v[i][j] = b2 * self.v[i][j] + (1.0 - b2) * gj * gj;
                p[j] -= (lr * (self.m[i][j] / c1) / ((self.v[i][j] / c2).sqrt() + eps)) as f32;
            }
        }
    }
}

/// Fit the student for `steps` Adam steps of learning rate `lr`; returns the loss before each
/// step. `log` prints every tenth.
pub fn fit(backend: &dyn Backend, steps: usize, lr: f64, log: bool) -> headmix::Result<Vec<f64>> {
    let task = Task::new(backend, 2, 16, 7)?;
    let mut student = Weights::random(&task.cfg, 1234);
    student.norm = Some(HeadNorm::Rms { gamma: vec![1.0; task.cfg.heads * task.cfg.head_dim] });
    let mut adam = Adam { m: vec![], v: vec![], t: 0 };
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let (loss, g) = task.loss_and_grads(backend, &student)?;
        if log && (step % 10 == 0 || step + 1 == steps) {
            println!("step {step:4}  loss {loss:.6}");
        }
        losses.push(loss);
        adam.step(&mut student, &g, lr);
    }
    Ok(losses)
}

/// The best backend whose backward runs, else the CPU.
pub fn backend() -> Box<dyn Backend> {
    let best = headmix::best().backend;
    let probe = Task::new(best.as_ref(), 1, 2, 0)
        .and_then(|t| t.loss_and_grads(best.as_ref(), &Weights::random(&t.cfg, 0)).map(|_| ()));
    match probe {
        Ok(()) => best,
        Err(e) => {
            eprintln!("note: {} has no backward ({e}); training on the CPU", best.kind());
            Box::new(headmix::backends::cpu::CpuBackend::new())
        }
    }
}

#[allow(dead_code)]
fn main() {
    let steps = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let backend = backend();
    println!("training an IHA layer (H = 2, P = 2, d = 8) on {} ({})", backend.kind(), backend.device_name());
    let losses = fit(backend.as_ref(), steps, 0.02, true).unwrap_or_else(|e| panic!("training failed: {e}"));
    println!("loss {:.6} -> {:.6}", losses[0], losses[losses.len() - 1]);
}
