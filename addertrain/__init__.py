"""addertrain: train multiplication-free AdderNets at scale."""

__version__ = "0.1.0"
