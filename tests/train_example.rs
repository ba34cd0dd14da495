//! The training example (`host/examples/train_iha.rs`) run briefly on the CPU: the loss falls.

#[path = "../host/examples/train_iha.rs"]
mod train_iha;

use headmix::backends::cpu::CpuBackend;

#[test]
fn training_example_loss_falls_on_the_cpu() {
    let losses = train_iha::fit(&CpuBackend::new(), 40, 0.02, false).expect("training runs");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(losses.iter().all(|l| l.is_finite()), "a loss is not finite: {losses:?}");
    assert!(last < 0.5 * first, "loss did not fall enough: {first:.4e} -> {last:.4e}");
}

/// Negative control: with a zero learning rate the loss stays where it starts, so the fall above
/// comes from the gradients and not from the task.
#[test]
fn training_example_with_zero_learning_rate_does_not_fall() {
    let losses = train_iha::fit(&CpuBackend::new(), 5, 0.0, false).expect("runs");
    assert!(losses.iter().all(|&l| l == losses[0]), "loss moved without steps: {losses:?}");
    assert!(losses[0] > 1e-3, "the student starts at the target: loss {:.3e}", losses[0]);
}
