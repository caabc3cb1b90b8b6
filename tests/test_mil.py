"""AttentionMIL: invariances that define attention pooling, checked by comparing two computations."""

from __future__ import annotations

import pytest
import torch

from weakcell.mil import AttentionMIL

D, C = 6, 3


@pytest.fixture(params=[False, True], ids=["plain", "gated"])
def mil(request: pytest.FixtureRequest) -> AttentionMIL:
    torch.manual_seed(0)
    return AttentionMIL(D, C, hidden=5, gated=request.param).eval()


def test_attention_rows_sum_to_one_over_real_cells(mil: AttentionMIL) -> None:
    bags = torch.randn(3, 7, D)
    mask = torch.arange(7) < torch.tensor([[7], [4], [1]])  # 7, 4 and 1 real cells
    out = mil(bags, mask)
    assert out["logits"].shape == (3, C)
    assert out["attention"].shape == (3, C, 7)
    assert out["instance_logits"].shape == (3, 7, C)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(3, C))
    assert (out["attention"][~mask[:, None, :].expand(-1, C, -1)] == 0).all()


def test_permuting_the_cells_permutes_attention_and_keeps_logits(mil: AttentionMIL) -> None:
    bags = torch.randn(2, 9, D)
    order = torch.randperm(9)
    out, shuffled = mil(bags), mil(bags[:, order])
    torch.testing.assert_close(shuffled["logits"], out["logits"])
    torch.testing.assert_close(shuffled["attention"], out["attention"][:, :, order])
    torch.testing.assert_close(shuffled["instance_logits"], out["instance_logits"][:, order])


def test_padding_with_garbage_changes_nothing_on_real_cells(mil: AttentionMIL) -> None:
    bags = torch.randn(2, 4, D)
    garbage = torch.randn(2, 3, D) * 1e4
    garbage[0, 0, 0] = float("nan")  # whatever a collate leaves in padding must not leak
    padded = torch.cat([bags, garbage], dim=1)
    mask = torch.arange(7).expand(2, 7) < 4
    out, out_padded = mil(bags), mil(padded, mask)
    torch.testing.assert_close(out_padded["logits"], out["logits"])
    torch.testing.assert_close(out_padded["attention"][..., :4], out["attention"])
    torch.testing.assert_close(out_padded["instance_logits"][:, :4], out["instance_logits"])
    assert (out_padded["attention"][..., 4:] == 0).all()
    assert torch.isfinite(out_padded["instance_logits"]).all()


def test_variable_bags_in_one_batch_match_each_bag_alone(mil: AttentionMIL) -> None:
    bags = torch.randn(2, 5, D)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    batched = mil(bags, mask)
    alone = mil(bags[1:, :2])
    torch.testing.assert_close(batched["logits"][1:], alone["logits"])
    torch.testing.assert_close(batched["attention"][1:, :, :2], alone["attention"])


def test_one_cell_bag_attends_fully_and_pools_that_cell(mil: AttentionMIL) -> None:
    cell = torch.randn(1, 1, D)
    out = mil(cell)
    torch.testing.assert_close(out["attention"], torch.ones(1, C, 1))
    # With all attention on one cell the pooled vector is that cell: logit_c = W_c . h + b_c.
    expected = cell[0] @ mil.classifier_weight.T + mil.classifier_bias
    torch.testing.assert_close(out["logits"], expected)


def test_zero_cell_bag_is_finite_and_gives_the_bias(mil: AttentionMIL) -> None:
    bags = torch.randn(2, 3, D)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    out = mil(bags, mask)
    for value in out.values():
        assert torch.isfinite(value).all()
    assert (out["attention"][1] == 0).all()
    torch.testing.assert_close(out["logits"][1], mil.classifier_bias.detach())


def test_each_class_attends_on_its_own(mil: AttentionMIL) -> None:
    out = mil(torch.randn(1, 8, D))
    assert not torch.allclose(out["attention"][0, 0], out["attention"][0, 1])


def test_gradients_reach_every_parameter_and_the_input(mil: AttentionMIL) -> None:
    bags = torch.randn(2, 4, D, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    out = mil.train()(bags, mask)
    (out["logits"].sum() + out["instance_logits"][mask].sum()).backward()
    for name, parameter in mil.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert bags.grad[mask].abs().sum() > 0
    assert (bags.grad[~mask] == 0).all()  # padding takes no part in the result


def test_wrong_shapes_are_refused(mil: AttentionMIL) -> None:
    with pytest.raises(ValueError, match="expected bags"):
        mil(torch.randn(2, 4, D + 1))
    with pytest.raises(ValueError, match="mask shape"):
        mil(torch.randn(2, 4, D), torch.ones(2, 5, dtype=torch.bool))


def test_bf16_autocast_runs() -> None:
    mil = AttentionMIL(D, C, gated=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mil(torch.randn(2, 4, D), torch.tensor([[True] * 4, [True, False, False, False]]))
    assert torch.isfinite(out["logits"].float()).all()
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, C))
