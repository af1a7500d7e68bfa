"""Sibling LoRA layers reading one input share ``x @ A^T``: same results as computing it per
layer."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import qpeft
from tests.models import tiny_llama
from tests.tolerances import FASTPATH_ATOL, FASTPATH_RTOL


class _CountMM(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.mm += 1
        return func(*args, **(kwargs or {}))


def _llama_two_adapters():
    model = tiny_llama().train()
    normal = "torch.nn.init.normal_"
    qpeft.update_model(
        model, {"adapter_cfg": {"*": {"rank": 4, "scale": 2.0, "lora_b_init": normal}}}
    )
    qpeft.update_model(
        model,
        {
            "adapter_name": "two",
            "adapter_cfg": {
                "*": {"rank": 2, "scale": 0.5, "lora_b_init": normal},
                "*k_proj": {"enable": False},
            },
        },
    )
    return qpeft.set_input_sharing(model, True)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def test_shared_low_rank_equals_per_layer_products_and_gradients():
    shared = _llama_two_adapters()
    alone = qpeft.set_input_sharing(copy.deepcopy(shared), False)
    ids = torch.randint(0, 64, (2, 7))
    for _ in range(3):  # the first step learns who reads the same input; later ones share
        got, want = _step(shared, ids), _step(alone, ids)
        torch.testing.assert_close(got[0], want[0], atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL)
        assert got[1].keys() == want[1].keys() and any("lora_a" in k for k in got[1])
        for k in got[1]:
            torch.testing.assert_close(
                got[1][k], want[1][k], atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL, msg=k
            )


def test_sharing_runs_fewer_matmuls_and_learns_q_k_v_and_gate_up():
    shared = _llama_two_adapters()
    alone = qpeft.set_input_sharing(copy.deepcopy(shared), False)
    ids = torch.randint(0, 64, (2, 7))
    counts = {}
    for name, model in (("shared", shared), ("alone", alone)):
        model(input_ids=ids)  # learn
        with torch.no_grad(), _CountMM() as mode:
            model(input_ids=ids)
        counts[name] = mode.mm
    # per layer: q/k/v share one product (2 fewer), gate/up one (1 fewer)
    assert counts["alone"] - counts["shared"] == 3 * len(shared.model.layers)
    attn = shared.model.layers[0].self_attn
    group = attn.q_proj._siblings
    assert group is attn.k_proj._siblings is attn.v_proj._siblings is attn.o_proj._siblings
    names = {id(m): n for n, m in attn.named_children()}
    leader = group.members.index(attn.q_proj)
    assert sorted(names[id(group.members[j])] for j in group._partners[leader]) == [
        "k_proj",
        "v_proj",
    ]


class _Pair(nn.Module):
    """Two projections of one input, with an in-place change of the input between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)
        self.mutate, self.other = False, None

    def forward(self, x):
        y = self.a(x)
        if self.mutate:
            x.mul_(3.0)
        return y, self.b(x if self.other is None else self.other)


def _pair():
    torch.manual_seed(0)
    model = _Pair()
    qpeft.update_model(
        model, {"adapter_cfg": {"*": {"rank": 2, "lora_b_init": "torch.nn.init.normal_"}}}
    )
    return qpeft.set_input_sharing(model, True), qpeft.set_input_sharing(
        copy.deepcopy(model), False
    )


def _same(model, ref, x):
    with torch.no_grad():
        for got, want in zip(model(x.clone()), ref(x.clone()), strict=True):
            torch.testing.assert_close(got, want, atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL)


def test_in_place_change_or_another_input_is_never_served_a_stale_product():
    model, ref = _pair()
    x = torch.randn(4, 6)
    _same(model, ref, x)
    _same(model, ref, x)  # now shared
    group = model.a._siblings
    assert group._partners[group.members.index(model.a)] == [group.members.index(model.b)]
    model.mutate = ref.mutate = True  # x changes in place between a and b: b must recompute
    _same(model, ref, x)
    model.mutate = ref.mutate = False
    model.other = ref.other = torch.randn(4, 6)  # b reads another tensor: unlearned, still right
    _same(model, ref, x)
    _same(model, ref, x)
    assert group._partners.get(group.members.index(model.a), []) == []


def test_changed_adapters_between_calls_are_not_served_old_factors():
    model, ref = _pair()
    x = torch.randn(4, 6)
    _same(model, ref, x)
    _same(model, ref, x)
    for m in (model, ref):  # a second adapter on b only: b's factors differ from the shared block's
        qpeft.update_model(
            m,
            {
                "adapter_name": "new",
                "adapter_cfg": {
                    "*": {"enable": False},
                    "b": {"rank": 3, "lora_b_init": "torch.nn.init.normal_"},
                },
            },
        )
    _same(model, ref, x)
    _same(model, ref, x)


def test_deepcopy_and_pickle_keep_sharing_per_model():
    model, ref = _pair()
    x = torch.randn(4, 6)
    _same(model, ref, x)
    clone = copy.deepcopy(model)
    assert clone.a._siblings is not model.a._siblings and clone.a._siblings.members[0] is clone.a
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (clone, loaded):
        _same(m, ref, x)
        _same(m, ref, x)


def test_model_with_siblings_compiles_with_fullgraph():
    model, ref = _pair()
    x = torch.randn(4, 6)
    _same(model, ref, x)  # learned partners must not break tracing
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x.clone()), ref(x.clone()), strict=True):
        torch.testing.assert_close(got, want, atol=FASTPATH_ATOL, rtol=FASTPATH_RTOL)


def test_off_by_default_recorded_and_restored(tmp_path):
    torch.manual_seed(0)
    model = _Pair()
    qpeft.update_model(model, {"adapter_cfg": {"*": {"rank": 2}}})
    assert not model.a._siblings.enabled  # off unless asked for
    qpeft.set_input_sharing(model, True)
    qpeft.update_model(model, {"adapter_name": "more", "adapter_cfg": {"*": {"rank": 1}}})
    assert (
        model.a._siblings.enabled and model.a._siblings is model.b._siblings
    )  # kept on re-linking
    qpeft.save(model, tmp_path / "ck")
    restored = qpeft.restore(_Pair(), tmp_path / "ck")
    assert restored.a._siblings.enabled and restored.a._siblings.members == [restored.a, restored.b]


def test_set_input_sharing_refuses_bad_input():
    with pytest.raises(ValueError, match="no LoRA layers"):
        qpeft.set_input_sharing(_Pair(), True)
    model, _ = _pair()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        qpeft.set_input_sharing(model, "yes")
