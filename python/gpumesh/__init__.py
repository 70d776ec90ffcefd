"""gpumesh: client of a gpumesh agent's local data-plane API.

``import gpumesh.torch`` registers the ``torch.distributed`` backend
``"gpumesh"``. The package itself depends only on the standard library;
``gpumesh.torch`` needs PyTorch.
"""

__version__ = "0.1.0"
