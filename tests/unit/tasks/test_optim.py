import math

import pytest
import torch

from mmclip import create_model
from mmclip.tasks.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine


def test_param_groups_follow_the_decay_rule_and_towers():
    model = create_model("tiny-vit")
    model.lock_text_tower()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, image_lr=2e-3)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(id(p) for p in trainable)  # each trainable parameter exactly once
    by_id = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = by_id[id(p)]
            assert (g["weight_decay"] > 0) == (p.ndim >= 2), name
            assert g["lr"] == (2e-3 if name.startswith(("image_tower", "image_proj")) else 1e-3), name
    no_decay = {by_id[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "logit_scale" in no_decay
    assert not any(n.startswith("text_tower") for n in by_id.values() if n in no_decay)  # locked: absent


def test_unknown_optimizer_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: .*adamw"):
        build_optimizer(create_model("tiny-vit"), name="lamb")


@pytest.mark.parametrize("shape", ["cosine", "linear", "constant"])
def test_schedule_matches_closed_form(shape):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=0.5)
    total, warmup, floor = 20, 5, 0.1
    sched = build_scheduler(opt, total_steps=total, name=shape, warmup_steps=warmup, min_lr_ratio=floor)
    for step in range(total):
        lr = opt.param_groups[0]["lr"]
        if step < warmup:
            expected = 0.5 * (step + 1) / warmup
        elif shape == "constant":
            expected = 0.5
        else:
            t = (step - warmup) / (total - warmup)
            decay = 0.5 * (1 + math.cos(math.pi * t)) if shape == "cosine" else 1 - t
            expected = 0.5 * (floor + (1 - floor) * decay)
        assert lr == pytest.approx(expected, rel=1e-12), step
        opt.step()
        sched.step()
    assert warmup_cosine(total, warmup, total, floor, "cosine") == pytest.approx(floor)
