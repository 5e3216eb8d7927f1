"""The deployment form of a compact CondenseNet(V2): plain ops that runtimes fuse.

The compact model's eager forward (row gathers, batched GEMMs, scatter-add) is fast in
PyTorch but opaque to ONNX Runtime and OpenVINO: exported, it becomes hundreds of
Reshape/Transpose/MatMul/ScatterND nodes around few convolutions. :func:`build_deploy_model`
rebuilds the network from the compact weights as convolutions with everything foldable
folded (all exact up to float rounding):

- the 3x3 unit's BN follows the LGC conv: scale into the conv's rows, shift into a bias,
  and its activation becomes the conv's fused activation;
- the LGC (per layer, :data:`LGC_FORMS`; the 3x3 conv likewise, :data:`CONV3_FORMS`):
  ``dense``: one 1x1 conv over all inputs with zeros where pruned (the masked layer's
  math: no gather, no shuffle, outputs written in the interleaved order directly);
  ``grouped``: channel Gather of the kept inputs, grouped 1x1 conv, then the shuffle as
  one channel Gather (a reshape-transpose-reshape costs two layout changes in both
  runtimes);
- the SFR's scatter-add is one dense 1x1 conv ``k -> c`` (zeros where no target) added
  to ``x``: duplicates sum, as in the scatter, and runtimes fuse the Add into the conv;
- a condensed classifier reads its kept inputs through zero columns of a dense Linear.

The pre-activation BN of each layer's input (and of the SFR input) cannot be folded: the
input is a concatenation, not a conv output. It is a BatchNormalization node for ONNX
Runtime (one pass) and a depthwise 1x1 conv for OpenVINO, which turns a BN into Multiply +
Add passes but fuses the conv with its activation (:data:`PREACT_FORM`). Which LGC form
is faster depends on the layer's size and the runtime; :func:`cdnv2.deploy.forms.choose_form`
holds the measured rule (docs/deploy.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compact.fold import NotFoldable, act_kind, fold_bn, fold_layer, is_compact_dense_layer
from ..errors import UserError

LGC_FORMS = ("dense", "grouped")
CONV3_FORMS = ("grouped", "dense")
RUNTIMES = ("onnxruntime", "openvino")


class DeployError(UserError, ValueError):
    """The model has no deployment form (not a condensed CondenseNet structure)."""


# ----------------------------------------------------------------------------- folds
def required_bn_affine(bn: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as float64 (scale, shift); Identity as (1, 0); :class:`DeployError` otherwise."""
    try:
        return fold_bn(bn, channels)
    except NotFoldable as e:
        raise DeployError(str(e)) from None


def act_name(act: nn.Module) -> str:
    """The activation's name in the deployment graph (:func:`~cdnv2.compact.fold.act_kind`)."""
    kind = act_kind(act)
    if kind == "module":
        raise DeployError(f"activation {type(act).__name__} has no deployment form")
    return kind


def apply_act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "hswish":
        return F.hardswish(x)
    return x


PREACT_FORMS = ("bn", "conv")
# How each runtime gets a pre-activation BN (measured, docs/deploy.md): ONNX Runtime runs a
# BatchNormalization node in one pass; OpenVINO decomposes it into Multiply + Add, but
# fuses a depthwise 1x1 Convolution (weight = scale, bias = shift) with the activation.
PREACT_FORM = {"onnxruntime": "bn", "openvino": "conv"}


class PreAct(nn.Module):
    """An eval BN and its activation where no conv precedes it (the input is a concat).

    ``form="bn"``: one BatchNormalization node; ``form="conv"``: the same affine map as a
    depthwise 1x1 conv. ``index`` (with ``channels``) places the BN's channels among more
    inputs; the others keep the identity map (their next conv reads them with zeros).
    """

    def __init__(self, bn: nn.Module, act: str, index: torch.Tensor | None = None, channels: int | None = None,
                 form: str = "bn"):
        super().__init__()
        if form not in PREACT_FORMS:
            raise DeployError(f"pre-activation form {form!r}: use one of {', '.join(PREACT_FORMS)}")
        if isinstance(bn, nn.Identity):
            raise DeployError("a pre-activation needs an eval-mode BatchNorm with running statistics, not Identity")
        scale, shift = required_bn_affine(bn, getattr(bn, "num_features", 0))
        n = channels or bn.num_features
        if index is not None:
            scale = scale.new_ones(n).index_copy(0, index, scale)
            shift = shift.new_zeros(n).index_copy(0, index, shift)
        self.form, self.act = form, act
        if form == "conv":
            self.norm = _conv(scale.view(n, 1, 1, 1), shift, groups=n)
        else:  # the BN itself, its statistics copied (channels outside ``index``: the defaults)
            self.norm = nn.BatchNorm2d(n, eps=bn.eps).eval().requires_grad_(False)
            self._load_bn(bn, index)

    def _load_bn(self, bn: nn.Module, index: torch.Tensor | None) -> None:
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(bn, name)
                if src is None:  # affine=False: weight 1, bias 0 (the defaults)
                    continue
                dst = getattr(self.norm, name)
                if index is None:
                    dst.copy_(src)
                else:  # channels not read by the next conv keep the neutral defaults
                    dst[index] = src.to(dst.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_act(self.act, self.norm(x))


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1, padding: int = 0) -> nn.Conv2d:
    out_ch, per_group, kh, kw = weight.shape
    conv = nn.Conv2d(per_group * groups, out_ch, (kh, kw), padding=padding, groups=groups, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(weight.float())
        if bias is not None:
            conv.bias.copy_(bias.float())
    return conv.requires_grad_(False)


# ----------------------------------------------------------------------------- layers
def parse_form(form: str) -> tuple[str, str]:
    """``"<lgc>/<conv3>"`` (e.g. ``"grouped/dense"``) -> (LGC form, 3x3 form)."""
    lgc, _, conv3 = form.partition("/")
    conv3 = conv3 or "grouped"
    if lgc not in LGC_FORMS or conv3 not in CONV3_FORMS:
        raise DeployError(f"layer form {form!r}: use <lgc>/<conv3> with lgc in {', '.join(LGC_FORMS)} "
                          f"and conv3 in {', '.join(CONV3_FORMS)}")
    return lgc, conv3


class DeployDenseLayer(nn.Module):
    """One dense layer: LGC -> 3x3 conv -> [SE] -> [SFR]; concat.

    ``form`` is ``"<lgc>/<conv3>"``: the LGC as a ``dense`` 1x1 conv over all inputs or
    ``grouped`` (gather, grouped conv, gather shuffle); the 3x3 conv ``grouped`` as
    trained or ``dense`` (zeros between groups: more multiply-adds, but the runtimes'
    dense kernels beat their grouped ones at 1-4 channels per group).
    """

    def __init__(self, layer: nn.Module, form: str, preact: str = "bn"):
        super().__init__()
        lgc_form, conv3_form = parse_form(form)
        try:
            f = fold_layer(layer)
        except NotFoldable as e:
            raise DeployError(str(e)) from None
        lgc = layer.conv_1
        self.form = f"{lgc_form}/{conv3_form}"
        g, o, c = f.groups, f.out_channels, f.in_channels
        self.act2 = act_name(layer.conv_2.act)
        if lgc_form == "dense":
            if f.dense_pre() is None:
                raise DeployError("dense LGC form: copies of an input channel carry different BN statistics")
            self.pre = PreAct(lgc.norm, act_name(lgc.act), f.index, c, form=preact)
            self.conv1 = _conv(f.dense_weight()[:, :, None, None], f.dense_bias(), 1)  # rows d*G+g
            self.register_buffer("index", None)
            self.register_buffer("shuffle", None)
        else:
            self.register_buffer("index", f.index.clone())
            self.pre = PreAct(lgc.norm, act_name(lgc.act), form=preact)
            self.conv1 = _conv(f.weight.reshape(o, -1, 1, 1), f.bias.reshape(-1), g)
            perm = torch.arange(o).view(o // g, g).t().reshape(-1)  # grouped position -> interleaved channel
            self.register_buffer("shuffle", torch.argsort(perm))  # interleaved channel -> grouped position
        conv3 = f.conv3
        w3 = conv3.weight.double()
        g3 = conv3.groups
        if conv3_form == "dense" and g3 > 1:
            k3, i3 = conv3.out_channels // g3, conv3.in_channels // g3
            dense = w3.new_zeros(conv3.out_channels, conv3.in_channels, *w3.shape[2:])
            for gi in range(g3):
                dense[gi * k3:(gi + 1) * k3, gi * i3:(gi + 1) * i3] = w3[gi * k3:(gi + 1) * k3]
            w3, g3 = dense, 1
        self.conv3 = _conv(w3, None if conv3.bias is None else conv3.bias.double(), g3, conv3.padding[0])
        self.se = _deploy_se(f.se)
        self.sfr_pre = self.sfr_conv = None
        if f.sfr is not None:
            self.sfr_pre = PreAct(layer.sfr.norm, act_name(layer.sfr.act), form=preact)
            self.sfr_conv = _conv(f.sfr.dense_weight[:, :, None, None], None, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if self.index is None else x.index_select(1, self.index)
        y = apply_act(self.act2, self.conv1(self.pre(a)))
        if self.shuffle is not None:
            y = y.index_select(1, self.shuffle)
        h = self.se(self.conv3(y))
        if self.sfr_conv is not None:
            x = x + self.sfr_conv(self.sfr_pre(h))
        return torch.cat([x, h], 1)


class DeploySE(nn.Module):
    """Squeeze-excitation with 1x1 convs on the pooled map (no flatten/unsqueeze reshapes)."""

    def __init__(self, se: nn.Module):
        super().__init__()
        fc1, fc2 = se.fc[0], se.fc[2]
        self.fc1 = _conv(fc1.weight.double()[:, :, None, None], None if fc1.bias is None else fc1.bias.double())
        self.fc2 = _conv(fc2.weight.double()[:, :, None, None], None if fc2.bias is None else fc2.bias.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


def _deploy_se(se: nn.Module) -> nn.Module:
    if isinstance(se, nn.Identity):
        return se
    fc = getattr(se, "fc", None)
    if not (isinstance(fc, nn.Sequential) and len(fc) == 4 and isinstance(fc[1], nn.ReLU)
            and isinstance(fc[3], nn.Sigmoid)):
        raise DeployError(f"{type(se).__name__} is not the SqueezeExcite of this package")
    return DeploySE(se)


def _dense_linear(classifier: nn.Module) -> nn.Linear:
    """A Linear, or a condensed classifier as a Linear with zero columns where not read."""
    if isinstance(classifier, nn.Linear):
        return classifier
    inner = getattr(classifier, "linear", None)
    index = getattr(classifier, "index", None)
    if not isinstance(inner, nn.Linear) or index is None:
        raise DeployError(f"classifier {type(classifier).__name__} has no deployment form")
    full = nn.Linear(classifier.in_features, inner.out_features)
    with torch.no_grad():
        w = inner.weight.new_zeros(inner.out_features, classifier.in_features)
        w.index_add_(1, index.long(), inner.weight)  # a read input may repeat: weights add up
        full.weight.copy_(w)
        full.bias.copy_(inner.bias)
    return full.requires_grad_(False)


# ----------------------------------------------------------------------------- model
class DeployModel(nn.Module):
    """A compact CondenseNet(V2) as plain ops (stem conv, deploy layers, pools, head).

    ``forms`` lists each dense layer's LGC form in order; ``metadata()`` describes them.
    """

    def __init__(self, model: nn.Module, runtime: str = "openvino", forms: list[str] | str | None = None,
                 input_size: tuple[int, int, int] = (3, 224, 224), preact: str | None = None):
        super().__init__()
        if runtime not in RUNTIMES:
            raise DeployError(f"runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
        self.preact = preact = preact or PREACT_FORM[runtime]
        features = getattr(model, "features", None)
        if not isinstance(features, nn.Sequential):
            raise DeployError(f"{type(model).__name__} has no `features` sequence of dense blocks")
        self.runtime = runtime
        layers = [m for m in features.modules() if is_compact_dense_layer(m)]
        if not layers:
            raise DeployError(f"{type(model).__name__} has no compact dense layers (convert it first)")
        if isinstance(forms, str):
            forms = [forms] * len(layers)
        if forms is None:
            from .forms import choose_form

            sizes = layer_input_sizes(features, input_size)
            forms = [choose_form(layer, h * w, runtime) for layer, (h, w) in zip(layers, sizes)]
        if len(forms) != len(layers):
            raise DeployError(f"{len(forms)} layer forms given for {len(layers)} dense layers")
        self.forms = list(forms)
        it = iter(self.forms)
        self.features = nn.Sequential()
        pending_bn = None
        for name, child in features.named_children():
            if isinstance(child, nn.Sequential) and all(is_compact_dense_layer(m) for m in child):
                child = nn.Sequential(*(DeployDenseLayer(layer, next(it), preact) for layer in child))
            elif is_compact_dense_layer(child):
                child = DeployDenseLayer(child, next(it), preact)
            elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                pending_bn = child
                continue
            elif pending_bn is not None and isinstance(child, (nn.ReLU, nn.Hardswish, nn.Identity)):
                child = PreAct(pending_bn, act_name(child), form=preact)
                pending_bn = None
            elif not isinstance(child, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d, nn.ReLU, nn.Hardswish, nn.Identity)):
                raise DeployError(f"features.{name} ({type(child).__name__}) has no deployment form")
            if pending_bn is not None:
                self.features.add_module(f"{name}_norm", PreAct(pending_bn, "identity", form=preact))
                pending_bn = None
            self.features.add_module(name, child)
        if pending_bn is not None:
            self.features.add_module("norm", PreAct(pending_bn, "identity", form=preact))
        self.se_last = _deploy_se(getattr(model, "se_last", nn.Identity()))
        fc = getattr(model, "fc", nn.Identity())
        self.fc = fc if isinstance(fc, nn.Identity) else _dense_linear(fc)
        self.fc_act = getattr(model, "fc_act", nn.Identity())
        self.fc_act_name = act_name(self.fc_act)
        self.classifier = _dense_linear(model.classifier)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.se_last(x.mean((2, 3), keepdim=True)).flatten(1)
        x = apply_act(self.fc_act_name, self.fc(x))
        return self.classifier(x)

    def metadata(self) -> dict[str, str]:
        """What goes into the exported file: the runtime the forms were chosen for, and the forms."""
        lgc = [f.split("/")[0] for f in self.forms]
        c3 = [f.split("/")[1] for f in self.forms]
        return {
            "cdnv2.deploy.runtime": self.runtime,
            "cdnv2.deploy.layer_forms": ",".join(self.forms),
            "cdnv2.deploy.preact_form": self.preact,
            "cdnv2.deploy.summary": (
                f"{len(self.forms)} dense layers as <LGC>/<3x3>; LGC: {lgc.count('dense')} dense 1x1 conv over all "
                f"inputs, {lgc.count('grouped')} channel Gather + grouped 1x1 conv + Gather shuffle, the 3x3 unit's "
                f"BN folded into it; 3x3: {c3.count('grouped')} grouped, {c3.count('dense')} dense over zeros; "
                "SFR: dense 1x1 conv + Add; pre-activation BNs: "
                + ("BatchNormalization" if self.preact == "bn" else "depthwise 1x1 conv (weight scale, bias shift)")
                + "; classifier: dense Linear"),
        }


def compact_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_compact_dense_layer(m)]


def layer_input_sizes(features: nn.Module, input_size) -> list[tuple[int, int]]:
    """(H, W) of each compact dense layer's input, from one forward with hooks."""
    pixels: list[tuple[int, int]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: pixels.append(tuple(args[0].shape[2:])))
             for m in features.modules() if is_compact_dense_layer(m)]
    try:
        with torch.enable_grad():  # the plain module path; the fused one skips hooks anyway
            features.eval()(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return pixels


def build_deploy_model(model: nn.Module, runtime: str = "openvino", forms=None,
                       input_size: tuple[int, int, int] = (3, 224, 224), preact: str | None = None) -> DeployModel:
    """The deployment form of a compact (or fully condensed masked) model, for ``runtime``."""
    if not any(is_compact_dense_layer(m) for m in model.modules()):
        from ..compact import check_fully_condensed, convert_model

        try:
            check_fully_condensed(model)
        except ValueError as e:
            raise DeployError(str(e)) from None
        model = convert_model(model, check=False)
    with torch.no_grad():
        return DeployModel(model.eval(), runtime, forms, input_size, preact)
