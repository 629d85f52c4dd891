"""sambayes: bSAM and SAM for PyTorch, exact and fused.

>>> opt = sambayes.BSAM(model.parameters(), num_data=len(train_set))
>>> loss = opt.step(closure)                     # closure: loss = f(model(x), y); loss.backward(); return loss
>>> probs = sambayes.predict(model, opt, x)      # Bayesian model average over 32 posterior samples
"""

__version__ = "0.1.0"

from ._base import split_batch
from ._model import frozen_bn_stats
from ._philox import noise_seed
from .bsam import BSAM
from .predict import predict
from .sam import SAM

__all__ = ["BSAM", "SAM", "__version__", "frozen_bn_stats", "noise_seed", "predict", "split_batch"]
