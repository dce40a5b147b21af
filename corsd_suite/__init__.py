__version__ = "0.0.1"

import warnings as _warnings
# Two warnings that fastai 2.8's own imports print on every import of this package, about fastai's code, not ours:
# it scripts activations with `torch.jit.script` (deprecated from torch 2.9) and sets pandas'
# `mode.chained_assignment` option (deprecated in pandas 3). Only these two messages are silenced.
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
_warnings.filterwarnings('ignore', message=r"The 'mode\.chained_assignment' option is deprecated")
