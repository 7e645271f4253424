"""LoRA: kohya and diffusers/PEFT files change sdlab's UNet and text encoder as they change diffusers'
models; merged or on the fly; unload is exact; several at once; files for other models fail whole."""

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import (
    StateDictType, convert_state_dict_to_peft, convert_unet_state_dict_to_peft,
)
from safetensors.torch import save_file
from torch import nn

import sdlab
from sdlab.adapters.lora import (
    LoraTag, apply_lora, apply_loras, applied_loras, find_lora, lora_hashes, lora_shorthash, parse_lora_option,
    parse_lora_tags, prompt_lora_tags, read_lora, set_prompt_loras, unload_loras,
)
from sdlab.adapters.lora_keys import unet_targets
from sdlab.errors import CheckpointError, InputError
from sdlab.tokenizer import get_tokenizer

from test_pipeline_parity import tiny_diffusers_sd

TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # models this small run faster on one thread than on two fighting over two cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = tiny_diffusers_sd(folder, request.param, "epsilon")
    return request.param, folder, reference


@pytest.fixture
def models(family):
    """A fresh sdlab pipeline and fresh copies of diffusers' UNet and text encoder with the same weights."""
    name, folder, reference = family
    return sdlab.load(str(folder)), copy.deepcopy(reference.unet), copy.deepcopy(reference.text_encoder)


# -- writing LoRA files the way trainers write them ------------------------------------------------------------


def unet_layers(unet, conv=True):
    """diffusers UNet modules kohya trains: every Linear/Conv2d in the transformers, and with LoCon
    (conv=True) those of the ResNet blocks and down/upsamplers."""
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if ".attentions." in name or (conv and any(p in name for p in (".resnets.", "samplers."))):
            yield name, module


def text_layers(text_encoder):
    for name, module in text_encoder.named_modules():
        if isinstance(module, nn.Linear) and (".self_attn." in name or ".mlp." in name):
            yield name.removeprefix("text_model."), module


def factors(module, rank, generator):
    if isinstance(module, nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator) * 0.1
        up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.1
    else:
        down = torch.randn(rank, module.in_features, generator=generator) * 0.1
        up = torch.randn(module.out_features, rank, generator=generator) * 0.1
    return down, up


def kohya_file(path, unet, text_encoder, seed=0, rank=4, conv=True, text=True, alpha=None):
    """lora_unet_<diffusers path with '_'> / lora_te_text_model_<...>, lora_down/lora_up/alpha (fp16 alpha,
    as kohya's trainer stores it); one `alpha` for every layer, as kohya writes, or varied per layer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    layers = [("lora_unet_" + n.replace(".", "_"), m) for n, m in unet_layers(unet, conv)]
    if text:
        layers += [("lora_te_text_model_" + n.replace(".", "_"), m) for n, m in text_layers(text_encoder)]
    for i, (key, module) in enumerate(layers):
        down, up = factors(module, rank, generator)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(float(alpha or 1 + i % rank), dtype=torch.float16)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def peft_file(path, unet, text_encoder, seed=0, rank=4):
    """diffusers' save_lora_weights layout: unet.<path>.lora_A/B.weight, text_encoder.<path>..., and the
    PEFT LoraConfig (r, lora_alpha, alpha_pattern) in `lora_adapter_metadata`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, layers in (("unet", unet_layers(unet, conv=False)), ("text_encoder", text_layers(text_encoder))):
        for name, module in layers:
            down, up = factors(module, rank, generator)
            state[f"{prefix}.{name}.lora_A.weight"], state[f"{prefix}.{name}.lora_B.weight"] = down, up
    special = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    metadata = {"unet.r": rank, "unet.lora_alpha": 8, "unet.alpha_pattern": {special: 2},
                "text_encoder.r": rank, "text_encoder.lora_alpha": 2}
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    return path, metadata, special


# -- the reference: diffusers' reading of the file, merged as PEFT merges it --------------------------------------


def merge_delta(module, down, up, scale):
    with torch.no_grad():
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(module.weight.shape)
        module.weight += scale * delta


def diffusers_merge_kohya(path, unet, text_encoder, weight=1.0):
    """Names and alphas as diffusers' lora_state_dict converts them; W += weight * alpha / rank * up @ down."""
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    for key, down in state.items():
        if not key.endswith("down.weight"):
            continue
        up = state[key.removesuffix("down.weight") + "up.weight"]
        alpha = alphas.get(key + ".alpha", alphas.get(key.split(".lora.")[0] + ".alpha"))
        component, rest = key.split(".", 1)
        if component == "unet":
            (peft_key,) = convert_unet_state_dict_to_peft({rest: down})
            model = unet
        else:
            (peft_key,) = convert_state_dict_to_peft({rest: down}, original_type=StateDictType.DIFFUSERS_OLD)
            model = text_encoder
        module = model.get_submodule(peft_key.split(".lora_A")[0].removeprefix("text_model."))
        merge_delta(module, down, up, weight * alpha / down.shape[0])


def peft_merge(path, metadata, special, unet, text_encoder):
    from safetensors.torch import load_file

    state = load_file(str(path))
    for key, down in state.items():
        if ".lora_A." not in key:
            continue
        component, rest = key.split(".", 1)
        name = rest.split(".lora_A")[0]
        alpha = metadata[f"{component}.lora_alpha"] if name != special else metadata["unet.alpha_pattern"][special]
        model = unet if component == "unet" else text_encoder
        merge_delta(model.get_submodule(name), down, state[key.replace("lora_A", "lora_B")], alpha / down.shape[0])


# -- comparing outputs ------------------------------------------------------------------------------------------


def inputs(pipe):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 7, pipe.config.unet.context_dim, generator=generator)
    ids = get_tokenizer().tokenize(["a photo of a cat"], pad_token_id=pipe.config.text.pad_token_id)
    return x, torch.tensor([421.0]), context, ids


@torch.no_grad()
def outputs(pipe):
    x, t, context, ids = inputs(pipe)
    return pipe.unet(x, t, context), pipe.text_encoder(ids)


@torch.no_grad()
def reference_outputs(pipe, unet, text_encoder):
    x, t, context, ids = inputs(pipe)
    return unet(x, t, encoder_hidden_states=context).sample, text_encoder(ids).last_hidden_state


def assert_matches(pipe, unet, text_encoder, base=None):
    ours, theirs = outputs(pipe), reference_outputs(pipe, unet, text_encoder)
    for o, r in zip(ours, theirs):
        torch.testing.assert_close(o, r, rtol=0, atol=TOLERANCE)
    if base is not None:  # the LoRA visibly changed both networks, so the match means something
        for o, b in zip(ours, base):
            assert (o - b).abs().max() > 1e-2


def snapshot(pipe):
    return {name: (t.data_ptr(), t.detach().clone()) for part in (pipe.unet, pipe.text_encoder)
            for name, t in part.state_dict(keep_vars=True).items()}


def assert_restored(pipe, before):
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for name, (pointer, value) in before.items():
        assert after[name][0] == pointer and torch.equal(after[name][1], value), name
    for module in list(pipe.unet.modules()) + list(pipe.text_encoder.modules()):
        assert not module._forward_hooks and not hasattr(module, "parametrizations")


# -- parity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merge", "dynamic"])
def test_kohya_lora_matches_diffusers(models, tmp_path, mode):
    pipe, unet, text_encoder = models
    base = outputs(pipe)
    path = kohya_file(tmp_path / "style.safetensors", unet, text_encoder)
    applied = apply_lora(pipe, path, 0.8, mode=mode)
    assert applied.lora.name == "style" and len(applied.updates) == len(read_lora(path).tensors) // 3
    diffusers_merge_kohya(path, unet, text_encoder, weight=0.8)
    assert_matches(pipe, unet, text_encoder, base)


@pytest.mark.parametrize("mode", ["merge", "dynamic"])
def test_peft_lora_matches_diffusers_layout(models, tmp_path, mode):
    pipe, unet, text_encoder = models
    base = outputs(pipe)
    path, metadata, special = peft_file(tmp_path / "pytorch_lora_weights.safetensors", unet, text_encoder)
    apply_lora(pipe, path, mode=mode)
    peft_merge(path, metadata, special, unet, text_encoder)
    assert_matches(pipe, unet, text_encoder, base)


@pytest.mark.parametrize("conv", [False, True])
def test_kohya_lora_matches_diffusers_load_lora_weights(family, tmp_path, conv):
    """The literal oracle: diffusers' own `load_lora_weights` (through PEFT) on the same file. One alpha for all
    layers, as kohya's trainer writes: diffusers drops per-layer alphas it cannot pattern-match."""
    name, folder, reference = family
    reference = copy.deepcopy(reference)
    pipe = sdlab.load(str(folder))
    base = outputs(pipe)
    path = kohya_file(tmp_path / "style.safetensors", reference.unet, reference.text_encoder, conv=conv, alpha=2.0)
    apply_lora(pipe, path, 1.0)
    reference.load_lora_weights(str(path))
    assert_matches(pipe, reference.unet, reference.text_encoder, base)


def test_text_encoder_and_unet_weights_apart(models, tmp_path):
    pipe, unet, text_encoder = models
    path = kohya_file(tmp_path / "style.safetensors", unet, text_encoder)
    text_only = copy.deepcopy(text_encoder)
    apply_lora(pipe, path, 0.0, te_weight=1.0)
    diffusers_merge_kohya(path, copy.deepcopy(unet), text_only)
    assert_matches(pipe, unet, text_only)


@pytest.mark.parametrize("mode", ["merge", "dynamic"])
def test_unload_restores_the_weights_bit_for_bit(models, tmp_path, mode):
    pipe, unet, text_encoder = models
    before, base = snapshot(pipe), outputs(pipe)
    path = kohya_file(tmp_path / "style.safetensors", unet, text_encoder)
    apply_lora(pipe, path, mode=mode)
    unload_loras(pipe)
    assert_restored(pipe, before)
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), base)) and applied_loras(pipe) == []


def test_several_loras_with_weights_and_modes(models, tmp_path):
    pipe, unet, text_encoder = models
    base = outputs(pipe)
    first = kohya_file(tmp_path / "first.safetensors", unet, text_encoder, seed=1)
    second = kohya_file(tmp_path / "second.safetensors", unet, text_encoder, seed=2, conv=False)
    apply_loras(pipe, [(first, 0.7)], mode="dynamic")
    apply_loras(pipe, [(second, -0.4)], mode="merge")
    diffusers_merge_kohya(first, unet, text_encoder, 0.7)
    diffusers_merge_kohya(second, unet, text_encoder, -0.4)
    assert_matches(pipe, unet, text_encoder, base)


def test_unloading_an_earlier_lora_keeps_the_later_one_exact(family, tmp_path):
    _, folder, reference = family
    first = kohya_file(tmp_path / "first.safetensors", reference.unet, reference.text_encoder, seed=1)
    second = kohya_file(tmp_path / "second.safetensors", reference.unet, reference.text_encoder, seed=2)
    pipe, only_second = sdlab.load(str(folder)), sdlab.load(str(folder))
    before = snapshot(pipe)
    a, _ = apply_loras(pipe, [(first, 0.5), (second, 0.9)])
    apply_loras(only_second, [(second, 0.9)])
    a.unload()
    assert [x.lora.name for x in applied_loras(pipe)] == ["second"]
    for (name, (_, ours)), (_, (_, expected)) in zip(snapshot(pipe).items(), snapshot(only_second).items()):
        assert torch.equal(ours, expected), name
    unload_loras(pipe)
    assert_restored(pipe, before)


def test_cp_decomposed_locon_is_the_three_convolutions(models):
    """LyCORIS lora_mid: x -> down (1x1) -> mid (the layer's kernel and stride) -> up (1x1)."""
    pipe, _, _ = models
    generator = torch.Generator().manual_seed(3)
    conv = pipe.unet.get_submodule("input_blocks.2.0.op")  # the stride-2 downsampler, diffusers' downsamplers.0.conv
    key = "lora_unet_down_blocks_0_downsamplers_0_conv"
    down = torch.randn(3, conv.in_channels, 1, 1, generator=generator) * 0.1
    mid = torch.randn(2, 3, 3, 3, generator=generator) * 0.1
    up = torch.randn(conv.out_channels, 2, 1, 1, generator=generator) * 0.1
    state = {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
             f"{key}.alpha": torch.tensor(1.5)}
    x = torch.randn(1, conv.in_channels, 8, 8, generator=generator)
    with torch.no_grad():
        expected = conv(x) + 0.6 * 1.5 / 3 * F.conv2d(F.conv2d(F.conv2d(x, down), mid, stride=2, padding=1), up)
        for mode in ("merge", "dynamic"):
            applied = apply_lora(pipe, state, 0.6, mode=mode)
            torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-6)
            applied.unload()


# -- files for other models ---------------------------------------------------------------------------------------


def test_a_lora_for_the_other_family_fails_and_changes_nothing(family, tmp_path):
    name, folder, _ = family
    other = "sd2" if name == "sd1" else "sd1"
    other_reference = tiny_diffusers_sd(tmp_path / other, other, "epsilon")
    path = kohya_file(tmp_path / "other.safetensors", other_reference.unet, other_reference.text_encoder)
    pipe = sdlab.load(str(folder))
    before = snapshot(pipe)
    good = kohya_file(tmp_path / "good.safetensors", family[2].unet, family[2].text_encoder)
    with pytest.raises(CheckpointError, match="does not fit this model, nothing was applied.*another model family"):
        apply_loras(pipe, [good, path])
    assert_restored(pipe, before)
    assert applied_loras(pipe) == []


@pytest.mark.parametrize("key, message", [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "SDXL"),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "SDXL"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_7_attn1_to_q.lora_down.weight",
     "modules this model does not have.*transformer_blocks_7"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LoHa"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "DoRA"),
    ("lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight", "SD3, Flux"),
])
def test_other_architectures_and_adapter_types_are_named(models, key, message):
    pipe, unet, text_encoder = models
    before = snapshot(pipe)
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{good}.lora_down.weight": torch.ones(2, 32), f"{good}.lora_up.weight": torch.ones(32, 2),
             key: torch.ones(2, 32)}
    with pytest.raises(CheckpointError, match=message):
        apply_lora(pipe, state)
    assert_restored(pipe, before)


def test_a_layer_without_its_up_weight_is_reported(models):
    pipe, _, _ = models
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(CheckpointError, match="attn1_to_q: has no up weight"):
        apply_lora(pipe, {f"{key}.lora_down.weight": torch.ones(2, 32)})


# -- prompts, files and infotext ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, text, tags", [
    ("a cat <lora:ink:0.8>", "a cat ", [LoraTag("ink", 0.8, 0.8)]),
    ("<lora:ink>a cat", "a cat", [LoraTag("ink", 1.0, 1.0)]),
    ("a <lora:ink:1:0.5> cat <lyco:paper:0.3>", "a  cat ", [LoraTag("ink", 1.0, 0.5), LoraTag("paper", 0.3, 0.3)]),
    ("<lora:ink:te=0.2:unet=0.6>", "", [LoraTag("ink", 0.2, 0.6)]),
    ("a <cat-toy> and (a:1.2) cat", "a <cat-toy> and (a:1.2) cat", []),
])
def test_lora_tags_are_taken_out_of_the_prompt(prompt, text, tags):
    assert parse_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize("prompt, message", [
    ("<hypernet:x:1>", "only"), ("<lora:ink:strong>", "numbers"), ("<lora:ink:dyn=4>", "write <lora:name>"),
])
def test_bad_tags_say_what_to_write(prompt, message):
    with pytest.raises(InputError, match=message):
        parse_lora_tags(prompt)


def test_a_batch_must_ask_for_the_same_loras():
    prompts, negatives, tags = prompt_lora_tags(["<lora:ink:0.5> a cat", "<lora:ink:0.5> a dog"], ["blurry", ""])
    assert prompts == [" a cat", " a dog"] and negatives == ["blurry", ""] and tags == [LoraTag("ink", 0.5, 0.5)]
    with pytest.raises(InputError, match="different <lora"):
        prompt_lora_tags(["<lora:ink> a cat", "a dog"])


def test_lora_files_are_found_by_stem(tmp_path):
    (tmp_path / "styles").mkdir()
    ink = tmp_path / "styles" / "Ink.safetensors"
    ink.write_bytes(b"")
    paper = tmp_path / "paper.pt"
    paper.write_bytes(b"")
    assert find_lora("Ink", [tmp_path]) == ink
    assert find_lora("ink", [tmp_path]) == ink
    assert find_lora("paper", [paper]) == paper
    with pytest.raises(InputError, match="no LoRA file called 'chalk'.*known: Ink, paper"):
        find_lora("chalk", [tmp_path])
    assert parse_lora_option("C:\\loras\\ink.safetensors:0.5") == ("C:\\loras\\ink.safetensors", 0.5)
    assert parse_lora_option("ink.safetensors") == ("ink.safetensors", 1.0)


def test_prompt_loras_stay_applied_until_the_tags_change(models, tmp_path, monkeypatch):
    import sdlab.adapters.lora as lora_module

    pipe, unet, text_encoder = models
    before = snapshot(pipe)
    kohya_file(tmp_path / "ink.safetensors", unet, text_encoder, seed=4)
    kohya_file(tmp_path / "paper.safetensors", unet, text_encoder, seed=5)
    reads = []
    read = lora_module.read_state_dict
    monkeypatch.setattr(lora_module, "read_state_dict", lambda path: reads.append(path) or read(path))
    first = set_prompt_loras(pipe, [LoraTag("ink", 0.5, 0.5)], [tmp_path])
    assert set_prompt_loras(pipe, [LoraTag("ink", 0.5, 0.5)], [tmp_path]) == first  # nothing re-read or re-merged
    assert len(reads) == 1
    second = set_prompt_loras(pipe, [LoraTag("ink", 0.5, 0.5), LoraTag("paper", 1.0, 0.2)], [tmp_path])
    assert [a.lora.name for a in second] == ["ink", "paper"]
    with pytest.raises(InputError, match="no LoRA file called 'chalk'"):
        set_prompt_loras(pipe, [LoraTag("chalk")], [tmp_path])
    assert applied_loras(pipe) == second  # the failed request left the model as it was
    unload_loras(pipe)  # taken off behind set_prompt_loras' back: the same tags apply them again
    again = set_prompt_loras(pipe, [LoraTag("ink", 0.5, 0.5)], [tmp_path])
    assert applied_loras(pipe) == again and again != first
    set_prompt_loras(pipe, [], [tmp_path])
    assert_restored(pipe, before)


def test_lora_hashes_follow_the_web_ui(tmp_path):
    path = tmp_path / "ink.safetensors"
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(path))
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    addnet = hashlib.sha256(data[8 + header:]).hexdigest()[:12]  # the tensors, not the JSON header
    assert lora_shorthash(path) == addnet
    assert lora_shorthash(path, {"sshs_model_hash": "abcdef0123456789"}) == "abcdef012345"
    pickle_path = tmp_path / "old.pt"
    torch.save({"lora_unet_x.alpha": torch.tensor(1.0)}, pickle_path)
    assert lora_shorthash(pickle_path) == hashlib.sha256(pickle_path.read_bytes()).hexdigest()[:12]

    class Applied:
        def __init__(self, lora):
            self.lora = lora

    ink, odd = read_lora(path), read_lora(pickle_path, name="a:b,c")
    assert lora_hashes([Applied(ink), Applied(odd)]) == f"ink: {addnet}, abc: {lora_shorthash(pickle_path)}"


def test_a_pipeline_strips_tags_applies_loras_and_gets_its_infotext_fields(models, tmp_path):
    from sdlab.adapters import apply_prompt_adapters, load_embeddings, unload_embeddings
    from sdlab.infotext import format_infotext, parse_infotext

    pipe, unet, text_encoder = models
    before = snapshot(pipe)
    ink = kohya_file(tmp_path / "ink.safetensors", unet, text_encoder)
    style = tmp_path / "my-style.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, pipe.config.text.width)}, "name": "x"}, style)
    load_embeddings(pipe.text_encoder, style)
    prompt = "<lora:ink:0.5> a my-style cat"
    prompts, negatives, fields = apply_prompt_adapters(pipe, [prompt], ["blurry"], lora_search=[tmp_path])
    assert prompts == [" a my-style cat"] and negatives == ["blurry"]
    assert fields == {"Lora hashes": f"ink: {lora_shorthash(ink)}",
                      "TI hashes": f"my-style: {hashlib.sha256(style.read_bytes()).hexdigest()[:12]}"}
    assert [a.lora.name for a in applied_loras(pipe)] == ["ink"]
    infotext = format_infotext(prompt, "blurry", {"Steps": 20, "Sampler": "Euler", "Seed": 1, **fields})
    assert f'Lora hashes: "ink: {lora_shorthash(ink)}"' in infotext
    assert parse_infotext(infotext)["Lora hashes"] == fields["Lora hashes"]

    _, _, fields = apply_prompt_adapters(pipe, ["a cat"], [""])
    assert fields == {"Lora hashes": None, "TI hashes": None}
    unload_embeddings(pipe.text_encoder)
    assert_restored(pipe, before)


def test_loras_asked_for_beside_the_prompt_are_written_as_the_web_uis_tags(models, tmp_path):
    from sdlab.adapters import lora_request_tags

    assert lora_request_tags([]) == ""
    assert lora_request_tags(["a/ink.safetensors", ("b/soft.pt", 0.75), ("c.safetensors", 0.5, 1.0)]) == \
        "<lora:ink:1> <lora:soft:0.75> <lora:c:0.5:1>"
    pipe, unet, text_encoder = models
    ink = kohya_file(tmp_path / "ink.safetensors", unet, text_encoder)
    assert lora_request_tags([(read_lora(ink, name="renamed"), 0.3)]) == "<lora:renamed:0.3>"
    settings = dict(steps=2, seed=4, width=32, height=32, sampler="Euler")
    given = pipe.txt2img("a cat", loras=[(str(ink), 0.8)], **settings)
    assert given.infotexts[0].startswith("a cat <lora:ink:0.8>\n")
    assert f'Lora hashes: "ink: {lora_shorthash(ink)}"' in given.infotexts[0]
    tagged = pipe.txt2img("a cat <lora:ink:0.8>", lora_dirs=[tmp_path], **settings)
    assert tagged.infotexts == given.infotexts
    assert torch.equal(tagged.latents, given.latents)
    unload_loras(pipe)


def test_kohya_names_of_the_original_unet_layout_are_read_too(models, tmp_path):
    pipe, unet, text_encoder = models
    path = kohya_file(tmp_path / "style.safetensors", unet, text_encoder, text=False)
    diffusers_named = read_lora(path)
    names = {path.replace(".", "_"): target.module.replace(".", "_")
             for path, target in unet_targets(pipe.unet).items()}
    ldm_named = {}
    for key, value in diffusers_named.tensors.items():
        layer, _, part = key.removeprefix("lora_unet_").partition(".")
        ldm_named[f"lora_unet_{names[layer]}.{part}"] = value
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in ldm_named
    x, t, context, _ = inputs(pipe)
    with torch.no_grad():
        applied = apply_lora(pipe, diffusers_named)
        expected = pipe.unet(x, t, context)
        applied.unload()
        apply_lora(pipe, ldm_named)
        torch.testing.assert_close(pipe.unet(x, t, context), expected, rtol=0, atol=0)
