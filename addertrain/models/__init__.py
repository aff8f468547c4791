from addertrain.models.resnet import ARCHS, adder_layers, create_model

__all__ = ["ARCHS", "adder_layers", "create_model"]
