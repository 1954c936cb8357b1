"""gobo: post-training compression of BERT-family encoders.

    >>> import gobo
    >>> cm = gobo.quantize("minilm-l6", bits=3)        # GOBO, data-free
    >>> gobo.save(cm, "out/minilm-3b")
    >>> model = gobo.load("out/minilm-3b")             # a transformers model

Heavy dependencies (transformers) load only when a function needs them.
"""

from .api import load, load_compressed, quantize, save
from .config import DirectQConfig, GoboConfig, QBertConfig, method_config
from .qtensor import QuantizedTensor

__version__ = "0.1.0"
__all__ = [
    "DirectQConfig",
    "GoboConfig",
    "QBertConfig",
    "QuantizedTensor",
    "__version__",
    "load",
    "load_compressed",
    "method_config",
    "quantize",
    "save",
]
