"""UI loading: kohya names -> each host's names, and the exact deltas every host adds.

The names are checked against diffusers' own single-file converters (full SD1.5 / SDXL U-Net
configs on the meta device, a tiny OpenCLIP text encoder); the deltas on tiny SD1 and SDXL models
against the network's own merge_into_base, through each host's naming and patch arithmetic.
"""
import copy
import dataclasses

import pytest
import torch

from sara_network import cli, fileformat, host_patch, ldm_names
from sara_network.ldm_names import ARCHS, UNetLayout
from sara_network.naming import text_encoder_prefixes
from sara_network.network import all_targets
from tests.models import random_sara_file, tiny_sd1, tiny_sdxl, tiny_text_encoder

SD15 = dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
TINY_SD1 = dataclasses.replace(ARCHS["sd1"], unet=UNetLayout(1, (True, False)))  # tests.models.tiny_unet


# ---------------------------------------------------------------------------------------------
# names
@pytest.mark.parametrize("arch, config, modules", [("sd1", SD15, 282), ("sdxl", SDXL, 794)])
def test_unet_names_match_diffusers_converter(arch, config, modules):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    state = unet.state_dict()
    layout = ARCHS[arch].unet
    checkpoint = {}
    for key, tensor in state.items():
        module, _, parameter = key.rpartition(".")
        checkpoint[f"model.diffusion_model.{ldm_names.diffusers_to_ldm_unet(module, layout)}.{parameter}"] = tensor
    back = convert_ldm_unet_checkpoint(checkpoint, unet.config)  # diffusers' LDM -> diffusers renaming
    assert [k for k in state if back.get(k) is not state[k]] == []

    targets = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(targets) == modules
    for path in targets:
        diffusers_name = "lora_unet_" + path.replace(".", "_")
        target = ldm_names.checkpoint_key(diffusers_name, arch)
        assert checkpoint[target.key].shape == state[path + ".weight"].shape
        assert (target.bias_key in checkpoint) == (path + ".bias" in state) and target.chunk is None
        ldm_path = target.key[len("model.diffusion_model."):-len(".weight")]
        ldm_name = "lora_unet_" + ldm_path.replace(".", "_")
        assert ldm_names.checkpoint_key(ldm_name, arch) == target  # kohya's SDXL names are LDM names
        assert ldm_names.ldm_to_diffusers_unet(ldm_path, layout) == path
        assert ldm_names.kohya_name_for_checkpoint_key(target.key, arch) == (ldm_name if arch == "sdxl"
                                                                            else diffusers_name)
        assert ldm_names.a1111_module_name(diffusers_name, arch) == "diffusion_model_" + ldm_path.replace(".", "_")
        assert ldm_names.comfy_key(diffusers_name, arch) == target.key[len("model."):]


def test_open_clip_names_match_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    encoder = tiny_text_encoder(5, with_projection=True)
    state = encoder.state_dict()
    prefix = ARCHS["sdxl"].text_encoders["lora_te2"].checkpoint_prefix
    checkpoint = {}
    linears = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    for path in linears + ["text_model.final_layer_norm"] + [f"text_model.encoder.layers.{i}.layer_norm{j}"
                                                               for i in range(2) for j in (1, 2)]:
        target = ldm_names.checkpoint_key("lora_te2_" + path.replace(".", "_"), "sdxl")
        assert target.key.startswith(prefix)
        for key, parameter in ((target.key, "weight"), (target.bias_key, "bias")):
            if key is None or path + "." + parameter not in state:
                continue
            value = state[path + "." + parameter]
            if target.chunk is not None:
                checkpoint.setdefault(key, torch.zeros((3 * value.shape[0],) + value.shape[1:]))
            else:
                checkpoint[key] = torch.zeros(value.t().shape if target.transposed else value.shape)
            target.view(checkpoint[key]).copy_(value)
    back = convert_open_clip_checkpoint(encoder, checkpoint, prefix=prefix)
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    assert {p + ".weight" for p in linears} <= set(back)
    in_proj = ldm_names.checkpoint_key("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", "sdxl")
    assert (in_proj.key, in_proj.chunk) == ("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", 2)
    assert ldm_names.kohya_name_for_checkpoint_key(in_proj.key, "sdxl", chunk=2) == \
        "lora_te2_text_model_encoder_layers_1_self_attn_v_proj"


def test_text_encoder_and_a1111_names():
    sd1 = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert ldm_names.checkpoint_key(sd1, "sd1").key == \
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert ldm_names.a1111_module_name(sd1, "sd1") == "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert ldm_names.comfy_key(sd1, "sd1") == "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    te1 = "lora_te1_text_model_encoder_layers_3_mlp_fc1"
    assert ldm_names.checkpoint_key(te1, "sdxl").key == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
    assert ldm_names.a1111_module_name(te1, "sdxl") == "0_transformer_text_model_encoder_layers_3_mlp_fc1"
    te2 = "lora_te2_text_model_encoder_layers_3_mlp_fc2"
    assert ldm_names.checkpoint_key(te2, "sdxl").key == \
        "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj.weight"
    assert ldm_names.a1111_module_name(te2, "sdxl") == "1_model_transformer_resblocks_3_mlp_c_proj"
    assert ldm_names.a1111_module_name("lora_te2_text_model_encoder_layers_3_self_attn_k_proj", "sdxl") == \
        "1_model_transformer_resblocks_3_attn"
    assert ldm_names.comfy_key(te2, "sdxl") == "clip_g.transformer.text_model.encoder.layers.3.mlp.fc2.weight"
    assert ldm_names.a1111_attention_siblings("1_model_transformer_resblocks_3_attn_k_proj") == [
        f"1_model_transformer_resblocks_3_attn_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert ldm_names.a1111_attention_siblings("0_transformer_text_model_encoder_layers_3_self_attn_k_proj") == []
    projection = ldm_names.checkpoint_key("lora_te2_text_projection", "sdxl")
    assert projection == ("conditioner.embedders.1.model.text_projection", None, None, True)
    assert ldm_names.arch_of({"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert ldm_names.arch_of({"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd1"
    assert ldm_names.arch_of({"ss_v2": "True"}) == "sd2"
    with pytest.raises(ldm_names.UnknownModuleName):
        ldm_names.checkpoint_key("lora_te2_text_model_encoder_layers_0_mlp_fc1", "sd1")
    with pytest.raises(ldm_names.UnknownModuleName):
        ldm_names.checkpoint_key("lora_unet_down_blocks_9_widgets_0_conv1", "sd1")


# ---------------------------------------------------------------------------------------------
# deltas
def host_weights(models, arch):
    """{kohya name: (module, checkpoint target)} for every Linear / Conv2d of the models."""
    prefixes = text_encoder_prefixes(models.text_encoders)
    return {t.name: (t.module, ldm_names.checkpoint_key(t.name, arch))
            for t in all_targets(models.unet, models.text_encoders, prefixes)}


def ldm_checkpoint(weights):
    """The models' Linear / Conv2d weights and biases as an LDM checkpoint (q/k/v fused for OpenCLIP)."""
    checkpoint = {}
    for module, target in weights.values():
        for key, value in ((target.key, module.weight), (target.bias_key, module.bias)):
            if key is None or value is None:
                continue
            shape = value.t().shape if target.transposed else value.shape
            if target.chunk is not None:
                shape = (3 * shape[0],) + tuple(shape[1:])
            target.view(checkpoint.setdefault(key, torch.zeros(shape))).copy_(value.detach())
    return checkpoint


def tiny_models(kind):
    from tests.models import tiny_flux, tiny_sd3

    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl, "flux": tiny_flux, "sd3": tiny_sd3}[kind]()


@pytest.fixture(scope="module", params=["sd1", "sdxl", "flux", "sd3"])
def setup(request, tmp_path_factory):
    if request.param in ("flux", "sd3"):
        pytest.importorskip("diffusers", minversion="0.30")
    tmp_path = tmp_path_factory.mktemp(request.param)
    models = tiny_models(request.param)
    arch = TINY_SD1 if request.param == "sd1" else request.param
    base = copy.deepcopy(models)
    path = str(tmp_path / f"{models.kind}.safetensors")
    net = random_sara_file(models, path, seed=3, metadata={"ss_output_name": "style"})
    multiplier = 0.7
    net.merge_into_base(multiplier)  # the reference: the network's own merge
    return dict(reference=host_weights(models, arch), base=host_weights(base, arch), arch=arch, path=path,
                multiplier=multiplier, deltas=fileformat.load_native(path)[0])


def test_native_file_has_what_the_lora_pages_read(setup):
    """A1111 / Forge list a file by ss_output_name, SD version (Forge: modelspec.architecture for SD1,
    ss_base_model_version for SDXL) and sshs_model_hash."""
    metadata = fileformat.read_tensors(setup["path"])[1]
    architecture = {"sd1": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora",
                    "flux": "flux-1-dev/lora", "sd3": "stable-diffusion-3-5-medium/lora"}
    kind = setup["arch"] if isinstance(setup["arch"], str) else "sd1"
    assert metadata["modelspec.architecture"] == architecture[kind]
    assert metadata["ss_output_name"] == "style" and len(metadata["sshs_model_hash"]) == 64


def test_checkpoint_merge_is_exact(setup):
    checkpoint = ldm_checkpoint(setup["base"])
    missing = host_patch.patch_checkpoint_(checkpoint, setup["deltas"], setup["arch"], setup["multiplier"])
    assert missing == []
    for name, (module, target) in setup["reference"].items():
        assert torch.equal(target.view(checkpoint[target.key]), module.weight), name
        if module.bias is not None:
            assert torch.equal(target.view(checkpoint[target.bias_key]), module.bias), name


def test_a1111_calc_updown_is_exact(setup):
    """A1111: the module found under a1111_module_name gets weight + multiplier * module_delta."""
    if setup["arch"] in ("flux", "sd3"):
        pytest.skip("A1111 has no FLUX.1 / SD3")
    def a1111_name(key):  # how A1111 names the module holding a checkpoint key (network_layer_mapping)
        for prefix, short in (("model.diffusion_model.", "diffusion_model_"), ("cond_stage_model.transformer.",
                              "transformer_"), ("conditioner.embedders.0.transformer.", "0_transformer_"),
                              ("conditioner.embedders.1.model.", "1_model_")):
            if key.startswith(prefix):
                return short + key[len(prefix):].rsplit(".", 1)[0].replace(".", "_")

    by_delta = {d.name: d for d in setup["deltas"]}
    for name, (module, target) in setup["base"].items():
        if name not in by_delta:
            continue
        assert ldm_names.a1111_module_name(name, setup["arch"]) == a1111_name(target.key)
        weight = module.weight.detach()
        updown, bias = host_patch.module_delta(by_delta[name], weight.shape, setup["multiplier"])
        reference = setup["reference"][name][0]
        assert torch.equal(weight + updown, reference.weight), name
        if bias is not None:
            assert torch.equal(module.bias.detach() + bias, reference.bias), name


def forge_merge(weight, patch, strength):
    """Forge's merge_lora_to_weight for the two patch kinds we emit: an fp32 copy of the weight,
    then extra_weight_calculators["sara"](weight, strength, delta) or `weight += strength * diff`."""
    kind, value = patch
    weight = weight.detach().to(torch.float32).clone()
    return host_patch.add_delta_(weight, value, strength) if kind == "sara" else weight + strength * value[0]


def test_forge_and_comfy_patches_are_exact(setup):
    base, reference, arch, multiplier = setup["base"], setup["reference"], setup["arch"], setup["multiplier"]
    key_map = {name: ldm_names.comfy_key(name, arch) for name in base}  # what the hosts' key maps hold
    tensors, _ = fileformat.read_tensors(setup["path"])
    tensors["lora_unet_unrelated.lora_up.weight"] = torch.zeros(1)

    deltas = host_patch.deltas_for(tensors, key_map)  # the Forge collection's load_lora
    assert set(deltas) == {d.name for d in setup["deltas"]}
    patches, unknown = host_patch.host_patches(deltas.values(), key_map, lambda d: ("sara", d))
    assert unknown == [] and list(host_patch.without_modules(tensors, deltas)) == ["lora_unet_unrelated.lora_up.weight"]
    assert sum(key.endswith(".bias") for key in patches) == sum(d.bias_indices is not None for d in deltas.values()) > 0
    owner = {key_map[name]: name for name in base}
    for key, patch in patches.items():
        is_bias = key.endswith(".bias")
        name = owner[key[:-len(".bias")] + ".weight" if is_bias else key]
        module, expected = base[name][0], reference[name][0]
        host, expected = (module.bias, expected.bias) if is_bias else (module.weight, expected.weight)
        assert torch.equal(forge_merge(host, patch, multiplier), expected), key
        if not is_bias:  # ComfyUI's SaraAdapter.calculate_weight: fp32 weight += function(strength * delta)
            comfy = host.detach().clone()
            comfy += host_patch.weight_delta(deltas[name], comfy.shape, multiplier)
            assert torch.equal(comfy, expected), key


def test_bypass_output_delta_matches_the_merged_layer(setup):
    """ComfyUI's bypass mode: the untouched layer's output plus output_delta (and the bias delta, which
    ComfyUI still patches into the bias) equals the merged layer's output."""
    generator = torch.Generator().manual_seed(5)
    for delta in setup["deltas"]:
        module, reference = setup["base"][delta.name][0], setup["reference"][delta.name][0]
        conv = None
        if isinstance(module, torch.nn.Conv2d):
            conv = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                        dilation=module.dilation, groups=module.groups)
            x = torch.randn(2, module.in_channels, 6, 6, generator=generator)
        else:
            x = torch.randn(3, module.in_features, generator=generator)
        with torch.no_grad():
            got = module(x) + host_patch.output_delta(delta, x, setup["multiplier"], conv)
            bias = host_patch.bias_delta(delta, setup["multiplier"])
            if bias is not None:
                got += bias.view(-1, 1, 1) if conv else bias
            torch.testing.assert_close(got, reference(x), atol=1e-5, rtol=1e-4, msg=delta.name)


def test_native_and_diff_file_patch_identically(setup, tmp_path):
    """The `sara to-diff` export (LyCORIS `diff`) gives the same weights through the same code path."""
    diff_path = str(tmp_path / "diff.safetensors")
    assert cli.main(["to-diff", setup["path"], diff_path]) == 0
    diff_tensors, _ = fileformat.read_tensors(diff_path)
    dense = host_patch.native_to_dense_patches(setup["path"])
    fillers = {key.split(".")[0] for key in diff_tensors} - dense.keys()  # zero OpenCLIP siblings for A1111
    assert all(not diff_tensors[f"{name}.diff"].any() for name in fillers)
    for name, (weight, bias) in dense.items():
        assert torch.equal(weight.half(), diff_tensors[f"{name}.diff"])
        assert (bias is None) == (f"{name}.diff_b" not in diff_tensors)
        module, delta = setup["base"][name][0], next(d for d in setup["deltas"] if d.name == name)
        native = forge_merge(module.weight, ("sara", delta), 0.7)
        assert torch.equal(native, forge_merge(module.weight, ("diff", (diff_tensors[f"{name}.diff"].float(),)), 0.7))
        if bias is not None:
            native_bias = module.bias.detach() + host_patch.bias_delta(delta, 0.7)
            diff_bias = module.bias.detach() + 0.7 * diff_tensors[f"{name}.diff_b"].float()
            assert torch.equal(native_bias, diff_bias), name


def test_module_delta_shapes():
    indices = torch.tensor([0, 5], dtype=torch.int32)
    delta = fileformat.ModuleDelta("lora_unet_x", (4, 2, 1, 1), indices, torch.tensor([1.0, -2.0]),
                                   bias_indices=torch.tensor([3], dtype=torch.int32), bias_values=torch.tensor([0.5]))
    weight, bias = host_patch.module_delta(delta, (4, 2), 2.0)  # a 1x1 conv delta on a Linear host
    assert weight.shape == (4, 2) and weight[0, 0] == 2.0 and weight[2, 1] == -4.0 and weight.sum() == -2.0
    assert bias.tolist() == [0, 0, 0, 1.0]
    conv = torch.zeros(4, 2, 1, 1)
    host_patch.add_delta_(conv, delta, 0.5)
    assert conv.view(-1)[[0, 5]].tolist() == [0.5, -1.0]
    with pytest.raises(fileformat.SaraFileError, match="another base"):
        host_patch.module_delta(delta, (4, 3))
    with pytest.raises(fileformat.SaraFileError, match="sara_shape"):
        host_patch.module_from_state_dict({"m.sara_values": torch.zeros(1), "m.sara_indices": indices[:1],
                                           "m.sara_shape": torch.tensor([2.0, 3.0])}, "m")
    assert host_patch.module_from_state_dict({"m.lora_up.weight": torch.zeros(1)}, "m") is None


# ---------------------------------------------------------------------------------------------
# a file for another model
def comfy_like_key_map(models, arch):
    """The kohya names a host's key map holds for a model (ComfyUI's and Forge's hold these and more)."""
    prefixes = text_encoder_prefixes(models.text_encoders)
    return {t.name: ldm_names.comfy_key(t.name, arch)
            for t in all_targets(models.unet, models.text_encoders, prefixes)}


@pytest.mark.parametrize("file_kind, host_kind", [("flux", "sdxl"), ("sdxl", "flux"), ("sd3", "flux"),
                                                  ("sd1", "sdxl"), ("sdxl", "sd1")])
def test_a_file_for_another_model_is_refused_whole(tmp_path, file_kind, host_kind):
    """host_patch.check_fits (run by the ComfyUI and Forge loaders before any patch exists): one error
    naming the file's model and the host's."""
    if "flux" in (file_kind, host_kind) or "sd3" in (file_kind, host_kind):
        pytest.importorskip("diffusers", minversion="0.30")
    path = str(tmp_path / "file.safetensors")
    random_sara_file(tiny_models(file_kind), path, seed=1, metadata={})
    shapes = host_patch.module_shapes(fileformat.read_tensors(path)[0])
    host = tiny_models(host_kind)
    key_map = comfy_like_key_map(host, TINY_SD1 if host_kind == "sd1" else host_kind)
    titles = {"sd1": "SD1/SD2", "sdxl": "SDXL", "flux": "FLUX.1", "sd3": "SD3"}
    with pytest.raises(fileformat.SaraFileError,
                       match=f"is a {titles[file_kind]} SaRA file and does not fit this {titles[host_kind]} model"):
        host_patch.check_fits(shapes, key_map)
    host_patch.check_fits(shapes, comfy_like_key_map(tiny_models(file_kind), TINY_SD1 if file_kind == "sd1"
                                                     else file_kind))  # its own model: fits


def test_check_fits_reads_parts_and_sizes(setup):
    shapes = {d.name: d.shape for d in setup["deltas"]}
    key_map = {name: ldm_names.comfy_key(name, setup["arch"]) for name in setup["base"]}
    unet_only = {name: key for name, key in key_map.items() if name.startswith("lora_unet_")}
    host_patch.check_fits(shapes, unet_only)  # a model-only loader: the text-encoder modules are not its business
    host_shapes = {key: tuple(setup["base"][name][0].weight.shape) for name, key in key_map.items()}
    host_patch.check_fits(shapes, key_map, host_shapes)
    name = next(n for n in shapes if n.startswith("lora_unet_"))
    host_shapes[key_map[name]] = (1, 1)
    with pytest.raises(fileformat.SaraFileError, match="1 have another size"):
        host_patch.check_fits(shapes, key_map, host_shapes)
