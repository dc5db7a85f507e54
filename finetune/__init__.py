"""Fine-tuning and evaluation of the pretrained encoder on the emotion benchmarks, sweeps, prediction."""
