"""What a layer keeps for backward. train.recompute=selective with the plugin's modules
(model/released.py): [swiglu] gives the same loss and gradients as keeping the SwiGLU output, bit
for bit; [layernorm] the same loss and gradients within float32 rounding (here on the CPU torch's
RMSNorm is a composite of several ops whose input-gradient terms the rebuilt graph sums in another
order; tests/gpu/test_selective_recompute.py checks bit equality with the fused GPU norm); and the
dropped outputs' memory is released between forward and backward. The core attention hands the
kernel a V of its own, so a kernel that saves V does not keep the whole fused QKV output alive
(model/core_attention.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.config import ConfigError, ModelConfig, ParallelConfig, ProLongConfig, TrainConfig, validate

LAYERS, S, H, F, VOCAB = 3, 64, 64, 160, 300


def _model(recompute: str, kernel: str = "auto", modules: tuple[str, ...] = ("swiglu",)):
    from megatron_prolong.attention.config import AttentionConfig
    from megatron_prolong.model.builder import build_model, build_transformer_config

    model_cfg = ModelConfig(num_layers=LAYERS, hidden_size=H, ffn_hidden_size=F, num_attention_heads=4,
                            num_query_groups=2, attention=AttentionConfig(kernel=kernel))
    tcfg = build_transformer_config(model_cfg, ParallelConfig(), TrainConfig(precision="fp32", recompute=recompute,
                                                                            recompute_modules=list(modules)))
    return build_model(model_cfg, tcfg, vocab_size=VOCAB, seq_length=S, seed=5)


def _packed():
    from megatron_prolong.attention.layout import DocumentLayout
    from megatron_prolong.model.packed import DocumentPackedSeqParams, rope_positions

    layout = DocumentLayout.from_cu_seqlens(torch.tensor([[0, 20, S]], dtype=torch.int32), S)
    return DocumentPackedSeqParams(qkv_format="sbhd", layout=layout,
                                   positions=rope_positions(layout, "continuous").t().contiguous())


def _step(model, tokens, saved: list | None = None, width: int = F):
    """Forward, then the number of ``width``-wide storages autograd saved that are live at its end, backward."""
    def pack(t):
        if saved is not None and not isinstance(t, torch.nn.Parameter):
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, None, None, labels=tokens, packed_seq_params=_packed()).sum()
    # F-wide storages still holding memory (the SwiGLU output and, unfused, its intermediates)
    f_wide = {t.untyped_storage().data_ptr() for t in saved or []
              if t.untyped_storage().nbytes() == S * width * t.element_size()}
    loss.backward()
    return loss.detach(), len(f_wide)


def test_same_loss_and_gradients_and_less_saved(megatron):
    from megatron_prolong.model.mlp import SwiGLURecomputeMLP

    kept, dropped = _model("none"), _model("selective")
    assert isinstance(dropped.decoder.layers[0].mlp, SwiGLURecomputeMLP)
    assert not isinstance(kept.decoder.layers[0].mlp, SwiGLURecomputeMLP)
    dropped.load_state_dict(kept.state_dict())
    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(0))
    saved_kept, saved_dropped = [], []
    loss_kept, f_kept = _step(kept, tokens, saved_kept)
    loss_dropped, f_dropped = _step(dropped, tokens, saved_dropped)
    assert torch.equal(loss_kept, loss_dropped)
    grads = dict(kept.named_parameters())
    for name, p in dropped.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    # Each layer's SwiGLU output (S x F) is released until fc2's backward refills it; only fc1's
    # output (2F wide) stays.
    assert f_kept >= LAYERS and f_dropped == 0
    # A second step on the same model: nothing of the first one's recompute is left behind.
    for m in (kept, dropped):
        m.zero_grad()
    assert torch.equal(_step(kept, tokens)[0], _step(dropped, tokens)[0])
    for name, p in dropped.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name


def _graph_nodes(root) -> list:
    seen, todo = {}, [root]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            todo.extend(n for n, _ in node.next_functions)
    return list(seen.values())


def _norm_outputs(model) -> list[torch.Tensor]:
    """The tensors the QKV and fc1 projections receive (the two RMSNorm outputs of each layer)."""
    seen = []
    for layer in model.decoder.layers:
        for linear in (layer.self_attention.linear_qkv, layer.mlp.linear_fc1):
            linear.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    return seen


@pytest.mark.parametrize("modules", [("layernorm",), ("swiglu", "layernorm")])
def test_norm_outputs_released_and_rebuilt(megatron, modules):
    from megatron_prolong.model.norm import RebuiltRMSNorm

    kept, dropped = _model("none"), _model("selective", modules=modules)
    assert isinstance(dropped.decoder.layers[0].input_layernorm, RebuiltRMSNorm)
    dropped.load_state_dict(kept.state_dict())
    inputs_kept, inputs_dropped = _norm_outputs(kept), _norm_outputs(dropped)
    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(3))
    losses, released, refilled = [], [], []
    for model, seen in ((kept, inputs_kept), (dropped, inputs_dropped)):
        loss = model(tokens, None, None, labels=tokens, packed_seq_params=_packed()).sum()
        released.append(sum(t.untyped_storage().nbytes() == 0 for t in seen))
        loss.backward()
        refilled.append(all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in seen))
        losses.append(loss)
    # With the step's graph still alive (as under pipeline parallelism until the next forward),
    # nothing of the rebuild is held past its projection's backward: no slot keeps a storage or
    # a rebuilt graph (the refilled output lives only as long as the tensors that saved it).
    slots = [node.slot for node in _graph_nodes(losses[1].grad_fn) if hasattr(node, "slot")]
    assert len(slots) == len(modules) * 2 * LAYERS - ("swiglu" in modules) * LAYERS
    assert all(slot.storage is None and slot.rebuilt is None for slot in slots)
    losses = [loss.detach() for loss in losses]
    assert released == [0, 2 * LAYERS] and all(refilled)
    # the rebuilt norm outputs equal the kept ones, bit for bit
    for a, b in zip(inputs_kept, inputs_dropped):
        assert torch.equal(a, b)
    assert torch.equal(losses[0], losses[1])
    grads = dict(kept.named_parameters())
    for name, p in dropped.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
        assert p.grad.abs().max() > 0, name


def test_without_grad_runs_the_plain_mlp(megatron):
    model = _model("selective")
    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(tokens, None, None, labels=tokens, packed_seq_params=_packed())
    b = _model("none")
    b.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(a, b(tokens, None, None, labels=tokens, packed_seq_params=_packed()))


@pytest.mark.parametrize("modules, backend, message", [
    (["moe"], "plugin", "choose one or more of"),
    ([], "plugin", "choose one or more of"),
    (["swiglu", "mlp"], "plugin", "keep one"),
    (["swiglu"], "te", "plugin path's layer"),
    (["layernorm"], "te", "plugin path's layer"),
    (["swiglu"], "te_linears", "Megatron's linears keep"),
])
def test_bad_recompute_modules_refused(modules, backend, message):
    cfg = ProLongConfig()
    cfg.train.recompute, cfg.train.recompute_modules = "selective", modules
    if backend == "te_linears":
        cfg.model.linear = "te"
    else:
        cfg.model.attention_backend = backend
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=1)


def test_attention_keeps_no_fused_qkv_output(megatron):
    """torch's SDPA saves q, k and v; V sliced from the fused QKV output would keep all of it
    (q before RoPE included) next to the rotated copies."""
    model = _model("none", kernel="sdpa")
    qkv_width = H + 2 * 2 * (H // 4)  # q + k + v of 4 heads in 2 groups
    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(2))
    assert _step(model, tokens, [], width=qkv_width)[1] == 0


@pytest.mark.parametrize("input_grad", [True, False])
def test_rebuilt_norm_gradients_with_and_without_input_gradient(input_grad):
    """The norm's weight gets its gradient even where its input needs none (a frozen embedding),
    and the released output is refilled for the projection that kept it."""
    from types import SimpleNamespace

    from megatron_prolong.model.norm import RebuiltRMSNorm, RMSNorm
    from megatron_prolong.model.released import release_after

    cfg = SimpleNamespace(params_dtype=torch.float32, sequence_parallel=False)
    g = torch.Generator().manual_seed(4)
    x0, w, proj = torch.randn(16, 2, 8, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, 5, generator=g)
    grads, hook_calls = [], []
    for cls in (RMSNorm, RebuiltRMSNorm):
        norm = cls(cfg, 8)
        norm.weight.data.copy_(w)
        calls = []
        norm.weight.register_hook(lambda g, calls=calls: calls.append(1) or g * 2)  # a user's gradient hook
        hook_calls.append(calls)
        x = x0.clone().requires_grad_(input_grad)
        y = norm(x)
        out = y @ proj.requires_grad_()
        release_after(y, out)
        assert (y.untyped_storage().nbytes() == 0) == (cls is RebuiltRMSNorm)
        out.square().sum().backward()
        grads.append((norm.weight.grad, x.grad, proj.grad.clone()))
        proj.grad = None
    (w_kept, x_kept, p_kept), (w_dropped, x_dropped, p_dropped) = grads
    assert [len(c) for c in hook_calls] == [1, 1]  # the rebuild does not run the weight's hooks again
    assert w_dropped is not None and w_dropped.abs().max() > 0
    torch.testing.assert_close(w_dropped, w_kept, rtol=1e-6, atol=1e-7)
    assert torch.equal(p_dropped, p_kept)  # the projection's weight gradient read the refilled output
    if input_grad:
        torch.testing.assert_close(x_dropped, x_kept, rtol=1e-6, atol=1e-7)
    else:
        assert x_dropped is None and x_kept is None
