"""The model registry of ``dynconv_torch.models``: entry points register themselves with ``@register_model``
under the names of :data:`dynconv_spec.MODEL_NAMES`; ``create_model(name, **kwargs)`` builds one
(``ValueError`` listing the known names for an unknown one), ``list_models(pattern=None)`` names them."""

from dynconv_spec import ModelRegistry

_REGISTRY = ModelRegistry("dynconv_torch.models")
register_model = _REGISTRY.register
create_model = _REGISTRY.create
list_models = _REGISTRY.names
