"""LoRA on Q and V of a timm ViT's fused qkv: unchanged at init, only adapters train, the base stays bit-identical,
the update sits in the Q and V rows alone, merge/unmerge, and an adapter-only file that reproduces the outputs."""
import pytest
import torch

from finetune.encoder import build_vit
from finetune.lora import QVLoRA, apply_lora, load_lora_state_dict, lora_state_dict
from pretrain.mae import get_arch


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    model = build_vit(get_arch("tiny"), num_classes=3)
    model.eval()
    return model


def test_lora_leaves_the_output_unchanged_at_init_and_trains_only_its_adapters():
    model, x = tiny_vit(), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: exactly the base model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert sum(len(g["params"]) for g in optim.param_groups) == len(names) == 2 * 2 * len(adapters)
    target = torch.randn(4, 3)
    for step in range(5):
        loss = ((model(x) - target) ** 2).mean()
        optim.zero_grad()
        loss.backward()
        if step == 0:  # B gets a gradient from the first step (A's is zero while B is)
            assert all(a.lora_B[t].grad.abs().sum() > 0 for a in adapters for t in a.targets)
        optim.step()
    state = model.state_dict()
    for key, value in base.items():
        moved = key.replace("attn.qkv.", "attn.qkv.base.")
        assert torch.equal(state[moved if moved in state else key], value), key  # the base is bit-identical
    with torch.no_grad():
        assert not torch.allclose(model(x), before)


def test_the_update_is_in_the_q_and_v_rows_only_and_merges():
    torch.manual_seed(1)
    qkv = torch.nn.Linear(16, 48)
    lora = QVLoRA(qkv, rank=2, alpha=4)
    for b in lora.lora_B.values():
        torch.nn.init.normal_(b)
    delta = lora.delta_weight()
    assert delta[16:32].abs().max() == 0  # K rows untouched
    assert delta[:16].abs().max() > 0 and delta[32:].abs().max() > 0
    x = torch.randn(5, 7, 16)
    with torch.no_grad():
        unmerged = lora(x)
        assert torch.allclose(unmerged, x @ (qkv.weight + delta).T + qkv.bias, atol=1e-5)
        weight = qkv.weight.clone()
        lora.merge()
        assert (lora(x) - unmerged).abs().max() < 1e-5
        lora.unmerge()
        assert (qkv.weight - weight).abs().max() < 1e-6
    with pytest.raises(ValueError, match="non-empty subset"):
        QVLoRA(torch.nn.Linear(16, 48), targets=("o",))


def test_the_adapter_only_file_reproduces_the_outputs(tmp_path):
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    apply_lora(model, rank=4, alpha=8, last_blocks=1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p)
    torch.save(lora_state_dict(model), tmp_path / "adapter.pt")
    assert all(".blocks.1." in f".{k}" for k in lora_state_dict(model))  # the last block only
    fresh = tiny_vit()
    apply_lora(fresh, rank=4, alpha=8, last_blocks=1)
    load_lora_state_dict(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(KeyError, match="does not fit"):
        load_lora_state_dict(tiny_vit(), torch.load(tmp_path / "adapter.pt", weights_only=True))
