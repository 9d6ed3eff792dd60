"""LoRA receivers (DroidSpeak brief §5 [reconstruction]): seeded, resumable training on a tiny
random Llama; float16 adapters verified by SHA-256; the packaged adapters on the real base."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from datahall.kvshare import finetune as ft  # noqa: E402
from datahall.kvshare.finetune import (  # noqa: E402
    PROJECTIONS,
    VARIANTS,
    VariantSpec,
    collate,
    encode,
    find_adapter,
    load_variant,
    merge_adapter,
    save_adapter,
    verify_adapter,
)
from datahall.kvshare.models import ModelError, tiny  # noqa: E402

SPEC = VariantSpec(
    "tiny",
    "test variant",
    lambda rng, split, budget: ("q", "a"),
    seed=7,
    steps=5,
    lr=1e-2,
    r=4,
    lora_alpha=8,
    seq_len=24,
    batch_size=2,
    warmup=1,
    checkpoint_every=2,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and spinning ones crawl on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batches(steps=SPEC.steps):
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(steps * SPEC.batch_size):
        n = 12 + i % 5
        ids = torch.randint(1, 256, (n,), generator=gen).tolist()
        labels = [-100] * 6 + ids[6:]  # loss on the "answer" only, as encode() does
        items.append((ids, labels))
    b = SPEC.batch_size
    return [collate(items[i * b : (i + 1) * b], pad_id=0) for i in range(steps)]


def lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_variants_have_the_required_fields():
    assert len(VARIANTS) >= 3 and {"coder", "docs", "dict"} <= set(VARIANTS)
    for name, spec in VARIANTS.items():
        assert spec.name == name and spec.description
        assert set(spec.target_modules) == set(PROJECTIONS)
        assert spec.steps > 0 and spec.lr > 0 and spec.r > 0 and spec.lora_alpha > 0
        assert spec.seq_len >= 64 and spec.batch_size >= 1 and callable(spec.corpus)
        json.dumps(spec.fingerprint())
    with pytest.raises(dataclasses.FrozenInstanceError):
        VARIANTS["coder"].steps = 1
    full = [s for s in VARIANTS.values() if s.layers is None]
    assert len({s.seed for s in full}) == len(full)


def test_band_variants_differ_from_their_full_variant_only_in_layers():
    bands = {name: spec for name, spec in VARIANTS.items() if spec.layers}
    assert set(bands) == {f"{v}-{b}" for v in ("coder", "docs", "dict") for b in ("mid", "top")}
    assert len({spec.layers for spec in bands.values()}) == 6  # the profiler must find each
    for name, spec in bands.items():
        full = VARIANTS[name.rsplit("-", 1)[0]]
        a, b = spec.layers
        assert 0 < a < b <= 30 and 5 <= b - a <= 7 and (b == 30) == name.endswith("-top")
        assert dataclasses.replace(spec, name=full.name, description=full.description,
                                   layers=None) == full  # fmt: skip
        assert spec.fingerprint()["layers"] == [a, b] and "layers" not in full.fingerprint()


@pytest.mark.parametrize("name", ["coder", "docs"])
def test_examples_are_reproducible_chat_pairs(name):
    a = ft.examples(name, 3, split="eval")
    assert a == ft.examples(name, 3, split="eval") and a != ft.examples(name, 3, seed=99)
    assert all(isinstance(u, str) and isinstance(r, str) and u and r.strip() for u, r in a)
    if name == "coder":
        assert all(u.startswith("Continue this Python code:") for u, _ in a)


def test_dict_examples_define_words():
    try:
        ex = ft.examples("dict", 20)
    except ValueError as e:  # Debian's wordnet-base is not installed
        pytest.skip(str(e))
    assert any(u.startswith("Define the word") for u, _ in ex)
    assert any("Glossary:" in u and answer in u for u, answer in ex)  # the lookup is extractive


def test_encode_masks_the_prompt_and_collate_pads():
    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<" + messages[0]["content"] + ">"

        def encode(self, text, add_special_tokens):
            return [2] if text == "<|im_end|>" else [ord(c) for c in text]

    ids, labels = encode(Tok(), ("ab", "xy"))
    assert ids == [60, 97, 98, 62, 120, 121, 2]
    assert labels == [-100] * 4 + [120, 121, 2]
    assert encode(Tok(), ("ab", "xy"), seq_len=6) is None
    batch = collate([(ids, labels), ([5, 6], [-100, 6])], pad_id=0)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 6] + [-100] * 5


def test_lr_schedule_warms_up_then_decays():
    spec = VARIANTS["coder"]
    lrs = [spec.lr_at(s) for s in range(spec.steps)]
    up, down = lrs[: spec.warmup], lrs[spec.warmup - 1 :]
    assert up == sorted(up) and up[-1] == pytest.approx(spec.lr)
    assert down == sorted(down, reverse=True) and down[-1] >= 0.1 * spec.lr


def test_training_is_deterministic():
    a = ft._train(tiny(seed=0), batches(), SPEC)
    b = ft._train(tiny(seed=0), batches(), SPEC)
    assert len(a.losses) == SPEC.steps and a.losses == b.losses
    assert same(lora(a.model), lora(b.model))
    assert not same(lora(a.model), lora(ft._lora(tiny(seed=0), SPEC)))  # it did train
    other = ft._train(tiny(seed=0), batches(), dataclasses.replace(SPEC, seed=8))
    assert not same(lora(a.model), lora(other.model))


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path):
    plain = ft._train(tiny(seed=0), batches(), SPEC)

    def stop_at_3(step, total, loss):
        if step == 3:  # after the step-2 checkpoint; step 3's work is lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ft._train(tiny(seed=0), batches(), SPEC, checkpoint=tmp_path, progress=stop_at_3)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 2
    seen = []
    resumed = ft._train(
        tiny(seed=0), batches(), SPEC, checkpoint=tmp_path, progress=lambda *a: seen.append(a)
    )
    assert resumed.resumed_from == 2 and [s for s, _, _ in seen] == [3, 4, 5]
    assert same(lora(resumed.model), lora(plain.model)) and resumed.losses == plain.losses
    # a checkpoint of another run (other data) is not resumed from
    fresh = ft._train(tiny(seed=0), batches(steps=4), SPEC, checkpoint=tmp_path)
    assert fresh.resumed_from == 0


def test_merged_model_differs_from_the_base():
    base = tiny(seed=0)
    merged = ft._train(tiny(seed=0), batches(), SPEC).model.merge_and_unload()
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4)
    base_w, merged_w = base.state_dict(), merged.state_dict()
    assert base_w.keys() == merged_w.keys()
    for name in base_w:
        adapted = any(f"{p}.weight" in name for p in PROJECTIONS)
        assert torch.equal(base_w[name], merged_w[name]) != adapted, name


def saved(tmp_path, name="tiny"):
    trained = ft._train(tiny(seed=0), batches(), SPEC)
    out = save_adapter(trained.model, tmp_path / name, {"name": name, "steps": SPEC.steps})
    return trained, out


def test_saved_adapter_loads_back_in_float16(tmp_path):
    from safetensors.torch import load_file

    trained, out = saved(tmp_path)
    marker = verify_adapter(out)
    assert marker["dtype"] == "float16" and marker["steps"] == SPEC.steps
    stored = load_file(str(out / "adapter_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    expect = trained.model.merge_and_unload()
    loaded = merge_adapter(tiny(seed=0), out)
    assert all(p.dtype == torch.float32 for p in loaded.parameters()) and not loaded.training
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        a, b = expect(ids).logits, loaded(ids).logits
    assert torch.allclose(a, b, atol=1e-3) and not torch.equal(b, tiny(seed=0)(ids).logits)


def corrupt(path: Path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_adapter_is_detected(tmp_path):
    _, out = saved(tmp_path)
    corrupt(out / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="corrupted"):
        verify_adapter(out)
    (out / "datahall.json").unlink()
    with pytest.raises(ModelError, match="no complete adapter"):
        verify_adapter(out)


def test_a_corrupted_cache_entry_is_deleted_and_the_packaged_adapter_used(tmp_path, monkeypatch):
    _, good = saved(tmp_path / "packaged", name="dict")
    monkeypatch.setattr(ft, "PACKAGED", tmp_path / "packaged")
    monkeypatch.setenv("DATAHALL_CACHE", str(tmp_path / "cache"))
    assert find_adapter("dict")[2] == "packaged"
    cached = tmp_path / "cache" / "adapters" / "dict"
    cached.mkdir(parents=True)
    for f in good.iterdir():
        (cached / f.name).write_bytes(f.read_bytes())
    assert find_adapter("dict")[2] == "cache"
    corrupt(cached / "adapter_model.safetensors")
    path, marker, source = find_adapter("dict")
    assert (path, source) == (good, "packaged") and marker["name"] == "dict"
    assert not any(cached.iterdir())  # the corrupted entry was removed
    corrupt(good / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="datahall kvshare finetune dict"):
        find_adapter("dict")


def test_a_cached_adapter_of_an_older_spec_is_not_used(tmp_path, monkeypatch):
    _, good = saved(tmp_path / "packaged", name="dict")
    monkeypatch.setattr(ft, "PACKAGED", tmp_path / "packaged")
    monkeypatch.setenv("DATAHALL_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "adapters" / "dict"
    cached.mkdir(parents=True)
    for f in good.iterdir():
        (cached / f.name).write_bytes(f.read_bytes())
    marker = json.loads((cached / "datahall.json").read_text())
    spec = VARIANTS["dict"].fingerprint(25)
    (cached / "datahall.json").write_text(json.dumps({**marker, "spec": spec}))
    assert find_adapter("dict")[2] == "cache"  # this spec, fewer steps (--steps 25): used
    stale = {**spec, "layers": [0, 4]}
    (cached / "datahall.json").write_text(json.dumps({**marker, "spec": stale}))
    assert find_adapter("dict")[2] == "packaged"
    assert not any(cached.iterdir())


def test_an_unknown_variant_names_the_variants():
    with pytest.raises(ModelError, match="coder, docs, dict"):
        load_variant("nope")
    with pytest.raises(ModelError, match="unknown variant"):
        ft.finetune("nope")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_packaged_adapters_are_complete_and_small(name):
    from safetensors import safe_open

    marker = verify_adapter(ft.PACKAGED / name)
    assert marker["name"] == name and marker["spec"] == VARIANTS[name].fingerprint()
    assert marker["bytes"] <= 6_000_000 and marker["final_loss"] < marker["first_loss"]
    with safe_open(ft.PACKAGED / name / ft.WEIGHTS, "pt") as f:
        layers = {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    assert layers == set(range(*(VARIANTS[name].layers or (0, 30))))


@pytest.mark.slow
def test_a_packaged_variant_loads_on_the_real_base(monkeypatch, tmp_path):
    from datahall.kvshare import models

    try:
        models.smollm2_checkpoint()
    except ModelError as e:
        pytest.skip(f"the SmolLM2 base cannot be created here: {e}")
    monkeypatch.setattr(ft, "cache_dir", lambda: tmp_path)  # ignore any locally trained adapter
    variant = load_variant("dict")
    base = models.load("smollm2")
    assert variant.meta["source"] == "packaged" and variant.base == base.base
    models.check_compatible(base, variant)
    q = "layers.3.self_attn.k_proj.weight"
    assert not torch.equal(
        variant.model.state_dict()[f"model.{q}"], base.model.state_dict()[f"model.{q}"]
    )
    ids = torch.tensor([base.encode("Define the word 'harbor'.")])
    with torch.no_grad():
        assert not torch.allclose(variant.model(ids).logits, base.model(ids).logits, atol=1e-3)
