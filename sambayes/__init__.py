"""sambayes: bSAM, SAM and IVON for PyTorch, exact and fused.

>>> opt = sambayes.BSAM(model, num_data=len(train_set))      # the module: its BatchNorm statistics are managed
>>> loss = opt.step(closure)                     # closure: loss = f(model(x), y); loss.backward(); return loss
>>> probs = sambayes.predict(model, opt, x)      # Bayesian model average over 32 posterior samples
"""

from ._version import __version__


def _bind_kernels() -> None:
    """Make ``sambayes.kernels`` the Triton kernels beside this very package.

    An installed package holds them in ``sambayes/kernels/``; a source tree (an editable
    install, or a checkout on ``sys.path``) keeps them in ``kernels/`` next to ``sambayes/``.
    Binding the name now keeps another install's import hooks from supplying other kernels.
    Importing ``sambayes.kernels`` itself is cheap: Triton loads with the phases that need it.
    """
    import importlib.util
    import pathlib
    import sys

    here = pathlib.Path(__file__).resolve().parent
    for folder in (here / "kernels", here.parent / "kernels"):  # installed; source tree
        if (folder / "__init__.py").is_file():
            spec = importlib.util.spec_from_file_location(
                "sambayes.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules["sambayes.kernels"] = module
            spec.loader.exec_module(module)
            globals()["kernels"] = module
            return


_bind_kernels()

from ._arguments import split_batch
from ._batchnorm import frozen_bn_stats
from ._philox import noise_seed
from .bsam import BSAM
from .ivon import IVON
from .predict import predict
from .sam import SAM

__all__ = ["BSAM", "IVON", "SAM", "__version__", "frozen_bn_stats", "noise_seed", "predict", "split_batch"]
