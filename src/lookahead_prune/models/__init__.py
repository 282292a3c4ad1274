"""The paper's architectures (Appendix C) and a string-keyed registry to build them.

All models take images [N, C, H, W], return logits [N, num_classes], are Glorot
initialised and can be traced by ``torch.fx.symbolic_trace``.
"""

from .activations import ACTIVATIONS, make_activation
from .conv6 import CONV6_CONFIG, Conv6
from .initialization import glorot_init
from .mlp import FCN, LinearNet
from .registry import MODELS, build_model, dense_layer_names, model_names
from .resnet import RESNET18_DENSE_LAYERS, BasicBlock, ResNet18
from .resnet50 import RESNET50_DENSE_LAYERS, RESNET50_STAGES, Bottleneck, ResNet50
from .vgg import VGG, VGG_CONFIGS
from .wrn import WRN_DENSE_LAYERS, WideBlock, WideResNet

__all__ = [
    "ACTIVATIONS",
    "CONV6_CONFIG",
    "FCN",
    "MODELS",
    "RESNET18_DENSE_LAYERS",
    "RESNET50_DENSE_LAYERS",
    "RESNET50_STAGES",
    "VGG",
    "VGG_CONFIGS",
    "WRN_DENSE_LAYERS",
    "BasicBlock",
    "Bottleneck",
    "Conv6",
    "LinearNet",
    "ResNet18",
    "ResNet50",
    "WideBlock",
    "WideResNet",
    "build_model",
    "dense_layer_names",
    "glorot_init",
    "make_activation",
    "model_names",
]
