"""LGC / SFR masks, pruning steps and group lasso against hand-checked examples."""
import math

import pytest
import torch

from cdnv2.layers import LearnedGroupConv, SparseFeatureReactivation, SqueezeExcite, create_act
from cdnv2.layers import grouped_to_interleaved, interleaved_to_grouped


def _lgc_example():
    # O=4 outputs, I=8 inputs, G=2 groups (outputs {0,2} and {1,3}), C=4: drop 2 inputs a step.
    m = LearnedGroupConv(8, 4, groups=2, condense_factor=4)
    w = torch.zeros(4, 8)
    # group 0 importance of input i = 8 - i (input 7 least important), split over outputs 0 and 2
    w[0] = torch.tensor([5.0, 4, 3, 2, 2, 1, 1, 0.5])
    w[2] = -torch.tensor([3.0, 3, 3, 3, 2, 2, 1, 0.5])
    # group 1 importance of input i = i + 1 (input 0 least important)
    w[1] = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8])
    with torch.no_grad():
        m.conv.weight.copy_(w[:, :, None, None])
    return m


def test_lgc_steps_drop_least_important_inputs_per_group():
    m = _lgc_example()
    expected_dropped = [({6, 7}, {0, 1}), ({4, 5, 6, 7}, {0, 1, 2, 3}), ({2, 3, 4, 5, 6, 7}, {0, 1, 2, 3, 4, 5})]
    for stage, (drop0, drop1) in enumerate(expected_dropped, start=1):
        m.condense_step()
        assert int(m.stage) == stage
        mask = m.mask[:, :, 0, 0]
        for o in range(4):
            dropped = drop0 if o % 2 == 0 else drop1
            assert set(torch.nonzero(mask[o] == 0).flatten().tolist()) == dropped, (stage, o)
    assert m.fully_condensed
    assert m.kept_indices().tolist() == [[0, 1], [6, 7]]
    assert m.density == pytest.approx(1 / 4)
    with pytest.raises(RuntimeError, match="already fully condensed"):
        m.condense_step()


def test_lgc_each_step_drops_exactly_one_cth_per_group_with_random_weights():
    m = LearnedGroupConv(48, 32, groups=4, condense_factor=6)
    for stage in range(1, 6):
        m.condense_step()
        gm = m.group_mask()
        assert gm.shape == (4, 48)
        assert (gm.sum(1) == 48 - stage * 8).all()
    # every output of a group shares its group's mask (interleaved assignment o % G)
    mask = m.mask[:, :, 0, 0].bool()
    for o in range(32):
        assert torch.equal(mask[o], m.group_mask()[o % 4])


def test_masked_weights_stay_dropped_even_if_weights_regrow():
    m = _lgc_example()
    m.condense_step()
    with torch.no_grad():
        m.conv.weight.fill_(100.0)  # dropped inputs must not come back
    m.condense_step()
    gm = m.group_mask()
    assert not gm[0, 6] and not gm[0, 7] and not gm[1, 0] and not gm[1, 1]
    assert gm.sum().item() == 2 * 4


def test_sfr_steps_drop_outputs_per_input_group():
    # SFR: k=4 inputs (groups {0,2}, {1,3}), c=8 outputs, C=4: drop 2 outputs a step.
    m = SparseFeatureReactivation(4, 8, groups=2, condense_factor=4)
    w = torch.zeros(8, 4)
    w[:, 0] = torch.arange(8, 0, -1).float()  # group 0: output 7 least important
    w[:, 1] = torch.arange(1, 9).float()  # group 1: output 0 least important
    with torch.no_grad():
        m.conv.weight.copy_(w[:, :, None, None])
    m.condense_step()
    mask = m.mask[:, :, 0, 0]
    for i in range(4):
        dropped = {6, 7} if i % 2 == 0 else {0, 1}
        assert set(torch.nonzero(mask[:, i] == 0).flatten().tolist()) == dropped
    m.condense_step()
    m.condense_step()
    assert m.kept_indices().tolist() == [[0, 1], [6, 7]]
    assert (m.group_mask().sum(1) == 2).all()


def test_sfr_forward_adds_into_x():
    m = SparseFeatureReactivation(4, 8, groups=2, condense_factor=2).eval()
    x, h = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 3, 3)
    expected = x + torch.nn.functional.conv2d(m.act(m.norm(h)), m.conv.weight)
    torch.testing.assert_close(m(x, h), expected)


def test_sfr_zero_init_is_a_noop_at_start():
    m = SparseFeatureReactivation(4, 8, groups=2, condense_factor=2, zero_init=True)
    m.reset_parameters()
    x, h = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m.eval()(x, h), x)


def test_group_lasso_matches_hand_computation():
    m = LearnedGroupConv(6, 4, groups=2, condense_factor=3)
    w = torch.randn(4, 6)
    with torch.no_grad():
        m.conv.weight.copy_(w[:, :, None, None])
    m.condense_step()
    mask = m.mask[:, :, 0, 0]
    expected = 0.0
    for g in range(2):
        for i in range(6):
            s = sum(float(w[o, i] * mask[o, i]) ** 2 for o in range(4) if o % 2 == g)
            expected += math.sqrt(max(s, 1e-6))
    assert m.lasso_penalty().item() == pytest.approx(expected, rel=1e-5)
    assert m.lasso_penalty().requires_grad


def test_invalid_shapes_raise_value_errors_naming_the_values():
    with pytest.raises(ValueError, match="groups=3"):
        LearnedGroupConv(8, 4, groups=3, condense_factor=2)
    with pytest.raises(ValueError, match="condense_factor=3"):
        LearnedGroupConv(8, 4, groups=2, condense_factor=3)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        create_act("gelu")


def test_forward_has_no_side_effects():
    m = LearnedGroupConv(8, 4, groups=2, condense_factor=4).train()
    before = m.mask.clone()
    for _ in range(3):
        m(torch.randn(2, 8, 4, 4))
    assert torch.equal(m.mask, before) and int(m.stage) == 0


def test_shuffles_are_inverse_permutations():
    x = torch.randn(2, 12, 3, 3)
    y = interleaved_to_grouped(x, 3)
    # channel d*G + g -> g*n + d
    assert torch.equal(y[:, 1 * 4 + 2], x[:, 2 * 3 + 1])
    assert torch.equal(grouped_to_interleaved(y, 3), x)


def test_squeeze_excite_scales_channels():
    se = SqueezeExcite(8)
    x = torch.randn(2, 8, 5, 5)
    y = se(x)
    scale = se.fc(x.mean((2, 3)))
    torch.testing.assert_close(y, x * scale[:, :, None, None])
