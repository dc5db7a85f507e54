"""The trainers' AdamW (fused) follows torch's per-tensor AdamW with the config's lr, betas and weight decay."""
import torch
from timm.optim import param_groups_weight_decay

from runtime.config import OptimConfig
from runtime.optim import adamw


def test_fused_adamw_matches_the_reference_update():
    cfg = OptimConfig(lr=3e-2, betas=(0.8, 0.9), weight_decay=0.1)
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
    ref.load_state_dict(ours.state_dict())
    start = ours[0].weight.detach().clone()
    opt = adamw(param_groups_weight_decay(ours, cfg.weight_decay), cfg)
    ref_opt = torch.optim.AdamW(param_groups_weight_decay(ref, cfg.weight_decay), lr=3e-2, betas=(0.8, 0.9),
                                foreach=False)
    assert opt.defaults["fused"]
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(5):
        for model, optimizer in ((ours, opt), (ref, ref_opt)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[0].weight, start)  # it did train
