"""Bad input gets a clear tritonmerge error that names what is wrong, never a torch traceback.

Each case checks the error class (a TritonMergeError subclass) and that the message names the
thing at fault (tensor, expert, parameter, value) and what would be allowed.
"""

from __future__ import annotations

import re

import pytest
import torch

import tritonmerge as tm
from tritonmerge import InputError, ParameterError, TritonMergeError, UnknownMethodError

BASE = torch.zeros(3, 4)


def raises(error: type[TritonMergeError], *fragments: str):
    """pytest.raises for a TritonMergeError whose message contains every fragment (literally)."""
    assert issubclass(error, TritonMergeError)
    return pytest.raises(error, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def test_every_public_error_derives_from_the_base_class():
    for name in ("ParameterError", "InputError", "UnknownMethodError", "BackendUnavailableError",
                 "CheckpointError", "ConfigError", "NonFiniteResultError"):
        assert issubclass(getattr(tm, name), TritonMergeError), name


def test_shape_mismatch_names_the_tensor_and_both_shapes():
    with raises(InputError, "layer.w", "expert 1", "(3, 5)", "(3, 4)"):
        tm.merge_tensors("linear", BASE, [BASE, torch.zeros(3, 5)], name="layer.w")


def test_shape_mismatch_in_state_dicts_names_the_key():
    with raises(InputError, "'b'", "(4, 3)", "(3, 4)"):
        tm.merge_state_dicts("ties", {"a": BASE, "b": BASE}, [{"a": BASE, "b": torch.zeros(4, 3)}])


def test_state_dicts_with_different_keys_name_the_keys():
    with raises(InputError, "expert 0", "'b'", "'c'"):
        tm.merge_state_dicts("task_arithmetic", {"a": BASE, "b": BASE}, [{"a": BASE, "c": BASE}])


def test_empty_expert_list():
    with raises(InputError, "empty"):
        tm.merge_tensors("linear", BASE, [])
    with raises(InputError, "empty"):
        tm.merge_state_dicts("ties", {"a": BASE}, [])


def test_non_tensor_input():
    with raises(InputError, "expert 0", "torch.Tensor", "ndarray"):
        tm.merge_tensors("linear", BASE, [BASE.numpy()])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["base", "expert"])
def test_non_finite_input_names_which_tensor(bad, where):
    poisoned = BASE.clone()
    poisoned[1, 2] = bad
    kind = "NaN" if bad != bad else "Inf"
    if where == "base":
        with raises(InputError, "'q.weight'", "base", f"1 {kind}"):
            tm.merge_tensors("linear", poisoned, [BASE, BASE], name="q.weight")
    else:
        with raises(InputError, "'q.weight'", "expert 1", f"1 {kind}"):
            tm.merge_tensors("linear", BASE, [BASE, poisoned], name="q.weight")


@pytest.mark.parametrize("density", [0, -0.1, 1.5, [0.5, 1.2], [0.0, 0.5]])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude", "breadcrumbs", "della"])
def test_density_outside_zero_one(method, density):
    with raises(ParameterError, method, "'density'", "> 0 and <= 1"):
        tm.merge_tensors(method, BASE, [BASE, BASE], density=density)


def test_unknown_parameter_suggests_the_close_one():
    with raises(ParameterError, "ties", "'densty'", "did you mean 'density'"):
        tm.merge_tensors("ties", BASE, [BASE], densty=0.5)


def test_unknown_method_suggests_a_close_match():
    with raises(UnknownMethodError, "'tie'", "did you mean", "'ties'"):
        tm.merge_tensors("tie", BASE, [BASE])
    with raises(UnknownMethodError, "'slurp'", "'slerp'"):
        tm.get_method("slurp")


def test_bad_choice_lists_the_allowed_values():
    with raises(ParameterError, "'topk_scope'", "'global'", "'tensor'", "'model'"):
        tm.merge_tensors("ties", BASE, [BASE], topk_scope="global")


@pytest.mark.parametrize(
    "method,param,values",
    [("ties", "weight", [1.0, 2.0]), ("dare_linear", "density", [0.5] * 4), ("consensus", "tall_lambda", [0.3])],
)
def test_wrong_number_of_per_model_values(method, param, values):
    with raises(ParameterError, method, f"'{param}'", f"{len(values)} values", "3 experts"):
        tm.merge_tensors(method, BASE, [BASE, BASE, BASE], **{param: values})


def test_linear_weights_summing_to_zero():
    with raises(ParameterError, "linear", "sum to 0"):
        tm.merge_tensors("linear", BASE, [BASE, BASE], weight=[1.0, -1.0])


@pytest.mark.parametrize("method,n,need", [("slerp", 2, "exactly 1"), ("model_stock", 1, "at least 2"), ("consensus", 1, "at least 2")])
def test_wrong_number_of_experts(method, n, need):
    with raises(InputError, method, need, f"got {n}"):
        tm.merge_tensors(method, BASE, [BASE] * n)


@pytest.mark.parametrize("t", [-0.1, 1.01])
def test_slerp_t_outside_zero_one(t):
    with raises(ParameterError, "slerp", "'t'", str(t)):
        tm.merge_tensors("slerp", BASE, [BASE], t=t)


def test_consensus_negative_k():
    with raises(ParameterError, "consensus", "'k'", ">= 0"):
        tm.merge_tensors("consensus", BASE, [BASE, BASE], k=-1)


def test_della_density_too_close_to_the_edges():
    with raises(ParameterError, "della", "epsilon"):
        tm.merge_tensors("della", BASE + 1, [BASE, BASE], density=0.9, epsilon=0.15)
