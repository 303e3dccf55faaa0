"""The gradual sparsity schedule shared by pruning and doping."""
import pytest

from leanlstm.methods.schedules import gradual_sparsity, phase_steps


def test_zhu_gupta_formula_clamped_outside_the_window():
    s = [gradual_sparsity(t, 0.95, 0.1, begin=100, end=1100) for t in range(0, 1500)]
    assert s[0] == s[100] == 0.1 and s[1100] == s[1499] == 0.95          # exactly the target from the end on
    assert s[600] == pytest.approx(0.95 + (0.1 - 0.95) * 0.5**3)
    assert all(b >= a for a, b in zip(s, s[1:]))                           # monotone
    assert s[101] - s[100] > s[1100] - s[1099]                              # fast at first, slow at the end


def test_pruning_events_every_dt_steps_hold_the_value_between_them():
    s = [gradual_sparsity(t, 0.9, begin=0, end=100, every=10) for t in range(101)]
    assert s[10:20] == [s[10]] * 10 and s[19] < s[20]
    assert s[99] == gradual_sparsity(90, 0.9, begin=0, end=100) and s[100] == 0.9


def test_degenerate_windows_and_phase_fractions():
    assert gradual_sparsity(5, 0.8, 0.2, begin=5, end=5) == 0.8
    assert gradual_sparsity(4, 0.8, 0.2, begin=5, end=5) == 0.2
    assert [phase_steps(f, 20) for f in (0.0, 0.25, 0.75, 1.0)] == [0, 5, 15, 20]
    with pytest.raises(ValueError, match="fraction"):
        phase_steps(1.5, 20)
