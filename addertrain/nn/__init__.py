from addertrain.nn.adder import AdderConv2d, adder_conv2d

__all__ = ["AdderConv2d", "adder_conv2d"]
