from addertrain.nn.adder import AdderConv2d, adder_conv2d
from addertrain.nn.norm import BatchNorm2d, average_running_stats, reestimated

__all__ = ["AdderConv2d", "BatchNorm2d", "adder_conv2d", "average_running_stats", "reestimated"]
