"""FLUX.1 and SD3: kohya's names in native files, exports diffusers loads, merges, the CLI.

Tiny diffusers transformers (tests/models.py) and the same layers in kohya's layout are the models.
The name map (sara_network.dit_names) is checked against diffusers' own single-file converters; the
exports are loaded by diffusers' own LoRA loaders (its kohya FLUX converter included) and every layer
they patch is compared with the network's own merge.
"""
import copy
import os

import pytest
import torch

from sara_network import cli, convert, dit_names, fileformat, ldm_names
from sara_network.naming import text_encoder_prefixes
from sara_network.network import all_targets
from tests.models import original_layout_state_dict, random_sara_file, tiny_flux, tiny_sd3

diffusers = pytest.importorskip("diffusers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

FOLDERS = {"flux": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}
CONVERTERS = {"flux": "convert_flux_transformer_checkpoint_to_diffusers",
              "sd3": "convert_sd3_transformer_checkpoint_to_diffusers"}
FLUX1_LINEAR1 = (3072, 3072, 3072, 12288)  # q, k, v, MLP rows of FLUX.1's linear1, fixed in diffusers' converter


def diffusers_layout(models) -> dict:
    """diffusers' own conversion of the original layout (its single-file loader's). Its FLUX converter
    splits linear1 at FLUX.1's widths, so each tiny q / k / v / MLP part goes in zero-padded to them
    and comes out cut back (the padding must come out zero: the parts landed where they belong)."""
    checkpoint = original_layout_state_dict(models)
    hidden = None
    if models.kind == "flux":
        for key in [k for k in checkpoint if ".linear1." in k]:
            tensor = checkpoint[key]
            hidden = models.diffusers.config.num_attention_heads * models.diffusers.config.attention_head_dim
            parts = tensor.split([hidden, hidden, hidden, tensor.shape[0] - 3 * hidden])
            checkpoint[key] = torch.cat([torch.cat([p, p.new_zeros(width - p.shape[0], *p.shape[1:])])
                                         for p, width in zip(parts, FLUX1_LINEAR1)])
    converted = getattr(single_file, CONVERTERS[models.kind])(checkpoint)
    if hidden is not None:
        sizes = {"to_q": hidden, "to_k": hidden, "to_v": hidden, "proj_mlp": 4 * hidden}
        for key, tensor in list(converted.items()):
            layer = key.split(".")[-2]
            if key.startswith("single_transformer_blocks.") and layer in sizes:
                assert not tensor[sizes[layer]:].any(), key
                converted[key] = tensor[:sizes[layer]]
    return converted


@pytest.fixture(scope="module", params=["flux", "sd3"])
def setup(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    models = tiny_flux() if request.param == "flux" else tiny_sd3()
    base = copy.deepcopy(models)
    path = str(tmp_path / f"{models.kind}.safetensors")
    net = random_sara_file(models, path, seed=5, metadata={"ss_output_name": f"tiny {models.kind}"})
    net.merge_into_base(1.0)  # the reference: the network's own merge, on kohya's layout
    return dict(kind=request.param, arch=request.param, base=base, merged=models, path=path, tmp=tmp_path,
                deltas=fileformat.load_native(path)[0])


def targets(models):
    return {t.name: t.module for t in all_targets(models.unet, models.text_encoders,
                                                  text_encoder_prefixes(models.text_encoders))}


# ---------------------------------------------------------------------------------------------
# names
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_kohya_layout_matches_diffusers_single_file_converter(kind):
    """kohya's layout built by dit_names, converted back by diffusers' own single-file converter, is the
    diffusers transformer again, every tensor; and every diffusers layer has its kohya counterpart."""
    models = tiny_flux() if kind == "flux" else tiny_sd3()
    state = models.diffusers.state_dict()
    back = diffusers_layout(models)
    assert sorted(back) == sorted(state)
    assert [k for k in state if not torch.equal(back[k], state[k])] == []
    layers = [n for n, m in models.diffusers.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    covered = {p.path for ps in dit_names.kohya_layout({n: state[n + ".weight"].shape for n in layers}, kind).values()
               for p in ps}
    assert covered == set(layers)


def test_kohya_names_of_flux_and_sd3():
    """Names as kohya's lora_flux / lora_sd3 write them, and where each host and checkpoint keeps the layer."""
    assert dit_names.pieces("single_blocks.3.linear1", (21504, 3072), "flux") == [
        dit_names.Piece(f"single_transformer_blocks.3.{p}", 0, n) for p, n in
        (("attn.to_q", 3072), ("attn.to_k", 3072), ("attn.to_v", 3072), ("proj_mlp", 12288))]
    assert dit_names.pieces("final_layer.adaLN_modulation.1", (6144, 3072), "flux") == [
        ("norm_out.linear", 3072, 3072), ("norm_out.linear", 0, 3072)]
    assert dit_names.kohya_path("transformer_blocks.2.attn.add_k_proj", "sd3") == \
        ("joint_blocks.2.context_block.attn.qkv", 1)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert ldm_names.split_name(qkv, "flux") == ("lora_unet", "double_blocks.0.img_attn.qkv")
    assert ldm_names.comfy_key(qkv, "flux") == "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert ldm_names.checkpoint_key(qkv, "flux").key == "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert ldm_names.checkpoint_key(qkv, "flux", unet_prefix="").key == "double_blocks.0.img_attn.qkv.weight"
    t5 = "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"
    assert ldm_names.comfy_key(t5, "flux") == "t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    assert ldm_names.checkpoint_key(t5, "sd3").key == \
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    assert ldm_names.comfy_key("lora_te2_text_model_encoder_layers_1_mlp_fc1", "sd3") == \
        "clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    assert ldm_names.split_name("lora_unet_joint_blocks_1_x_block_adaLN_modulation_1", "sd3")[1] == \
        "joint_blocks.1.x_block.adaLN_modulation.1"
    assert ldm_names.kohya_name_for_checkpoint_key("single_blocks.0.linear1.weight", "flux", unet_prefix="") == \
        "lora_unet_single_blocks_0_linear1"
    with pytest.raises(ldm_names.UnknownModuleName, match="SDXL"):
        ldm_names.split_name("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "sdxl")
    with pytest.raises(ldm_names.UnknownModuleName, match="AUTOMATIC1111"):
        ldm_names.a1111_module_name(qkv, "flux")


def test_native_file_names_and_metadata(setup):
    """A native file of kohya's layout carries kohya's names and the metadata the UIs read; it reads back
    exactly and its base model is known from its names alone."""
    metadata = fileformat.read_tensors(setup["path"])[1]
    names = {d.name for d in setup["deltas"]}
    expected = {"flux": ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1",
                         "lora_unet_final_layer_adaLN_modulation_1", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                         "lora_te3_encoder_block_0_layer_0_SelfAttention_q"),
                "sd3": ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
                        "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1", "lora_unet_x_embedder_proj",
                        "lora_te2_text_model_encoder_layers_1_mlp_fc2", "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo")}
    assert set(expected[setup["kind"]]) <= names
    assert metadata["modelspec.architecture"] == {"flux": "flux-1-dev/lora",
                                                  "sd3": "stable-diffusion-3-5-medium/lora"}[setup["kind"]]
    assert convert.base_model_version(names, {}) == {"flux": "flux1", "sd3": "5-medium"}[setup["kind"]]
    assert ldm_names.arch_of(metadata) == setup["arch"]
    base, merged = targets(setup["base"]), targets(setup["merged"])
    for delta in setup["deltas"]:  # the file holds what the network merges, under the model's names
        change = merged[delta.name].weight.detach() - base[delta.name].weight.detach()
        torch.testing.assert_close(change, delta.dense(torch.float32).reshape(change.shape), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# merge into a single-file checkpoint and into a diffusers folder
def single_file_checkpoint(models, arch, unet_prefix):
    checkpoint = {}
    for name, module in targets(models).items():
        target = ldm_names.checkpoint_key(name, arch, unet_prefix)
        checkpoint[target.key] = module.weight.detach().clone()
        if module.bias is not None:
            checkpoint[target.bias_key] = module.bias.detach().clone()
    return checkpoint


@pytest.mark.parametrize("unet_prefix", ["model.diffusion_model.", ""])
def test_merge_into_single_file_checkpoint_is_exact(setup, unet_prefix):
    if unet_prefix == "" and setup["kind"] != "flux":
        pytest.skip("only FLUX.1 is released as a bare transformer file")
    base_path, out = str(setup["tmp"] / f"base{len(unet_prefix)}.safetensors"), str(setup["tmp"] / f"m{len(unet_prefix)}.safetensors")
    checkpoint = single_file_checkpoint(setup["base"], setup["arch"], unet_prefix)
    expected = single_file_checkpoint(setup["merged"], setup["arch"], unet_prefix)
    source = setup["path"]
    if not unet_prefix:  # Black Forest Labs' file: the transformer alone, so a file of transformer deltas
        checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("text_encoders.")}
        source = str(setup["tmp"] / "unet-only.safetensors")
        fileformat.save_native(source, [d for d in setup["deltas"] if d.name.startswith("lora_unet_")], None,
                               fileformat.read_tensors(setup["path"])[1])
    fileformat.save_tensors(base_path, checkpoint, {}, with_hash=False)
    assert cli.main(["merge", source, "--base", base_path, "-o", out, "-q"]) == 0
    merged = fileformat.read_tensors(out)[0]
    assert set(merged) == set(checkpoint)
    changed = [k for k in merged if not torch.equal(merged[k], checkpoint[k])]
    assert changed and [k for k in merged if not torch.equal(merged[k], expected[k])] == []


def save_pipeline_folder(models, folder):
    models.diffusers.save_pretrained(os.path.join(folder, "transformer"))
    for sub, encoder in zip(FOLDERS[models.kind], models.text_encoders):
        encoder.save_pretrained(os.path.join(folder, sub))


def test_merge_into_diffusers_folder_is_exact(setup):
    """The stacked kohya layers are split back into diffusers' layers: the merged transformer equals
    diffusers' own conversion of the reference merge, and the text encoders equal the reference's."""
    folder, out = str(setup["tmp"] / "pipeline"), str(setup["tmp"] / "merged-pipeline")
    save_pipeline_folder(setup["base"], folder)
    base = convert.load_base(folder)
    assert base.version == {"flux": "flux1", "sd3": "5-medium"}[setup["kind"]]
    assert {d.name for d in setup["deltas"]} <= set(base.weights())
    assert cli.main(["merge", setup["path"], "--base", folder, "-o", out, "-q"]) == 0
    merged = type(setup["base"].diffusers).from_pretrained(os.path.join(out, "transformer")).state_dict()
    expected = diffusers_layout(setup["merged"])
    untouched = setup["base"].diffusers.state_dict()
    assert sum(not torch.equal(merged[k], untouched[k]) for k in merged) > 0
    assert [k for k in merged if not torch.equal(merged[k], expected[k])] == []
    reference = targets(setup["merged"])
    encoders = dict(zip(FOLDERS[setup["kind"]], setup["base"].text_encoders))
    for (sub, encoder), prefix in zip(encoders.items(), text_encoder_prefixes(setup["base"].text_encoders)):
        loaded = type(encoder).from_pretrained(os.path.join(out, sub))
        weights = {t.name: t.module.weight for t in all_targets(None, [loaded], [prefix])}
        assert weights and all(torch.equal(w, reference[n].weight) for n, w in weights.items()), sub


# ---------------------------------------------------------------------------------------------
# exports that diffusers loads
def peft_deltas(model) -> dict:
    """{layer path: the delta PEFT adds to its weight} for every LoRA layer diffusers injected."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            adapter = module.active_adapters[0]
            found[name] = module.get_delta_weight(adapter).detach().float()
    return found


def expected_transformer_deltas(setup) -> dict:
    before, after = diffusers_layout(setup["base"]), diffusers_layout(setup["merged"])
    return {k[:-len(".weight")]: after[k] - before[k] for k in after
            if k.endswith(".weight") and not torch.equal(after[k], before[k])}


def lora_export(setup, name, args, keep=lambda delta: True):
    """`sara to-lora` of the setup's file (minus modules `keep` rejects): full rank, fp32, exact SVD."""
    source = str(setup["tmp"] / f"{name}-native.safetensors")
    deltas = [d for d in setup["deltas"] if keep(d)]
    fileformat.save_native(source, deltas, None, fileformat.read_tensors(setup["path"])[1])
    out = str(setup["tmp"] / f"{name}.safetensors")
    assert cli.main(["to-lora", source, out, "--rank", "256", "--svd", "exact", "--dtype", "fp32", "-q", *args]) == 0
    return out


def load_in_pipeline(setup, lora_path):
    """FluxPipeline / StableDiffusion3Pipeline around copies of the base models (no VAE, no tokenizers:
    loading a LoRA touches neither), then its own load_lora_weights."""
    parts = dict(zip(FOLDERS[setup["kind"]], copy.deepcopy(setup["base"].text_encoders)))
    tokenizers = {f"tokenizer{sub[len('text_encoder'):]}": None for sub in parts}
    pipeline_class = diffusers.FluxPipeline if setup["kind"] == "flux" else diffusers.StableDiffusion3Pipeline
    pipeline = pipeline_class(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                              transformer=copy.deepcopy(setup["base"].diffusers), **parts, **tokenizers)
    pipeline.load_lora_weights(lora_path, adapter_name="sara")
    return pipeline


def check_transformer(pipeline, expected):
    got = peft_deltas(pipeline.transformer)
    assert sorted(got) == sorted(expected)  # every layer the file changes, and no other, got a LoRA
    for layer, delta in expected.items():
        torch.testing.assert_close(got[layer].reshape(delta.shape), delta, atol=2e-5, rtol=1e-4, msg=layer)


def check_text_encoder(setup, pipeline, encoder_index):
    folder = FOLDERS[setup["kind"]][encoder_index]
    got = peft_deltas(getattr(pipeline, folder))
    prefix = text_encoder_prefixes(setup["base"].text_encoders)[encoder_index]
    base, merged = targets(setup["base"]), targets(setup["merged"])
    expected = {ldm_names.split_name(name, setup["arch"])[1]: merged[name].weight.detach() - base[name].weight.detach()
                for name in base if name.startswith(prefix + "_") and not torch.equal(merged[name].weight, base[name].weight)}
    assert expected and len(got) == len(expected), folder
    for layer, delta in got.items():
        path = layer if layer.startswith("text_model.") else "text_model." + layer  # transformers 5's CLIPTextModel
        torch.testing.assert_close(delta, expected[path], atol=2e-5, rtol=1e-4, msg=layer)


def kohya_lora_layers(delta) -> bool:
    """What kohya's own FLUX LoRA trains by default (double / single blocks, CLIP-L), minus linear1: all
    diffusers' kohya FLUX converter takes. It splits linear1 at FLUX.1's widths only (checked in the next
    test); 0.32 refuses a file holding embedders, the final layer or T5, 0.42 drops their LoRA unsaid."""
    return delta.name.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_")) \
        and not delta.name.endswith("_linear1")


def test_kohya_flux_lora_loads_through_diffusers_converter(tmp_path):
    """`sara to-lora` of a FLUX file, loaded by FluxPipeline.load_lora_weights (diffusers' kohya FLUX
    converter): every layer gets its delta, the fused q/k/v split into to_q/to_k/to_v, CLIP-L too."""
    models = tiny_flux()
    base = copy.deepcopy(models)
    path = str(tmp_path / "flux.safetensors")
    net = random_sara_file(models, path, seed=5, metadata={})
    net.merge_into_base(1.0)
    setup = dict(kind="flux", arch="flux", base=base, merged=models, path=path, tmp=tmp_path,
                 deltas=fileformat.load_native(path)[0])
    for delta in setup["deltas"]:  # the reference: only the layers the export keeps
        if not kohya_lora_layers(delta):
            targets(models)[delta.name].weight.data.copy_(targets(base)[delta.name].weight)
    pipeline = load_in_pipeline(setup, lora_export(setup, "kohya", [], keep=kohya_lora_layers))
    expected = expected_transformer_deltas(setup)
    assert any(layer.endswith("attn.to_k") for layer in expected)
    check_transformer(pipeline, expected)
    check_text_encoder(setup, pipeline, 0)


def test_kohya_flux_linear1_at_flux1_width(tmp_path):
    """diffusers' kohya converter splits single_blocks linear1 at FLUX.1's widths: a file with one such
    layer (3072 wide, a delta in four rows: rank 4, exported exactly) lands on to_q, to_k, to_v and
    proj_mlp of the real FLUX.1 transformer (built on the meta device) with exactly its rows."""
    shape = (3 * 3072 + 12288, 3072)
    rows = torch.tensor([5, 3072 + 7, 2 * 3072 + 1, 3 * 3072 + 100])
    columns = torch.tensor([0, 17, 3071, 2048])
    indices = (rows * shape[1] + columns).to(torch.int32).sort().values
    values = torch.tensor([0.5, -0.25, 0.125, 1.0])
    name = "lora_unet_single_blocks_37_linear1"
    source = str(tmp_path / "native.safetensors")
    fileformat.save_native(source, [fileformat.ModuleDelta(name, shape, indices, values)], None,
                           {"ss_base_model_version": "flux1"})
    out = str(tmp_path / "lora.safetensors")
    assert cli.main(["to-lora", source, out, "--rank", "4", "--dtype", "fp32", "-q"]) == 0
    state_dict = diffusers.FluxPipeline.lora_state_dict(out)
    with torch.device("meta"):
        flux1 = diffusers.FluxTransformer2DModel(guidance_embeds=True)
    layers = dict(flux1.named_modules())
    dense = torch.zeros(shape)
    dense.view(-1)[indices.long()] = values
    start = 0
    for piece in dit_names.pieces("single_blocks.37.linear1", shape, "flux"):
        key = f"transformer.{piece.path}"
        down, up = state_dict[f"{key}.lora_A.weight"].float(), state_dict[f"{key}.lora_B.weight"].float()
        assert layers[piece.path].weight.shape == (up.shape[0], down.shape[1])
        torch.testing.assert_close(up @ down, dense[start:start + piece.rows], atol=1e-6, rtol=1e-5)
        start += piece.rows
    assert start == shape[0]


def test_diffusers_format_export_loads_in_pipelines(setup):
    """`sara to-lora --format diffusers`: FluxPipeline / StableDiffusion3Pipeline load it as it is; every
    transformer layer (stacked layers split, final AdaLN halves swapped) and the CLIP layers get their
    deltas; T5 is left out with a warning, as those pipelines load no LoRA into it."""
    out = lora_export(setup, "peft", ["--format", "diffusers"])
    tensors = fileformat.read_tensors(out)[0]
    assert all(k.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) for k in tensors)
    assert not any(".block." in k for k in tensors)
    pipeline = load_in_pipeline(setup, out)
    check_transformer(pipeline, expected_transformer_deltas(setup))
    for index in range(len(convert.DIFFUSERS_LORA_PARTS[setup["kind"]]) - 1):
        check_text_encoder(setup, pipeline, index)


def test_diffusers_format_is_only_for_flux_and_sd3(tmp_path):
    from tests.models import tiny_sd1

    path = str(tmp_path / "sd1.safetensors")
    random_sara_file(tiny_sd1(), path, seed=1, metadata={})
    assert cli.main(["to-lora", path, str(tmp_path / "out.safetensors"), "--rank", "2", "--format", "diffusers"]) == 1
    assert not os.path.exists(tmp_path / "out.safetensors")


# ---------------------------------------------------------------------------------------------
# inspect, analyze, from-lora on FLUX / SD3 bases
def test_cli_reads_flux_and_sd3_bases(setup, capsys):
    """A diffusers pipeline folder and a single-file checkpoint of the same weights are the same base
    under kohya's names: the file fits both (same base hash as at training), analyze sees the same
    weights, and from-lora projects a LoRA onto the same selection from either."""
    import json

    folder, checkpoint = str(setup["tmp"] / "cli-pipeline"), str(setup["tmp"] / "cli-base.safetensors")
    save_pipeline_folder(setup["base"], folder)
    fileformat.save_tensors(checkpoint, single_file_checkpoint(setup["base"], setup["arch"], "model.diffusion_model."),
                            {}, with_hash=False)
    reports = []
    for base in (folder, checkpoint):
        capsys.readouterr()
        assert cli.main(["inspect", setup["path"], "--base", base, "--json", "-q"]) == 0
        report = json.loads(capsys.readouterr().out)["base"]
        assert report["fits"] and report["hash_matches"], base
        assert cli.main(["analyze", base, "--json", "-q"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0] == reports[1] and reports[0]["selected_fraction"] > 0
    lora = str(setup["tmp"] / "cli-lora.safetensors")
    assert cli.main(["to-lora", setup["path"], lora, "--rank", "8", "-q", "--show", "0"]) == 0
    projected = []
    for index, base in enumerate((folder, checkpoint)):
        out = str(setup["tmp"] / f"cli-projected{index}.safetensors")
        assert cli.main(["from-lora", lora, out, "--base", base, "--density", "0.05", "-q", "--show", "0"]) == 0
        projected.append({d.name: d for d in fileformat.load_native(out)[0]})
    assert projected[0].keys() == projected[1].keys() == {d.name for d in setup["deltas"]}
    dense = convert.lora_deltas(fileformat.read_tensors(lora)[0])
    for name, delta in projected[0].items():
        other = projected[1][name]
        assert torch.equal(delta.indices, other.indices) and torch.equal(delta.values, other.values), name
        assert torch.equal(delta.values, dense[name].reshape(-1)[delta.indices.long()]), name
