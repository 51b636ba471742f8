"""``benchmarks/gpu_profile.py`` runs (a smoke run on CPU: the tiny config, no CUDA kernels, the
graphed inference through its eager fallback, the graphed step skipped) and reports every part
of a row in its summary."""
from benchmarks import gpu_profile


def test_gpu_profile_covers_inference_and_the_training_step(capsys):
    assert gpu_profile.main(["vpt", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "## vpt inference, eager" in out
    assert "## vpt inference, graphed" in out
    assert "## vpt training step (fwd + CLS/SEG loss + bwd + AdamW), eager" in out
    assert "## vpt training step, graphed" in out
    summary = out.split("## summary", 1)[1]
    parts = ["infer", "infer-graphed", "train"] + (["train-graphed"] if gpu_profile.ON_GPU else [])
    for part in parts:
        assert f"| vpt | {part} |" in summary
