"""The names of the items a masked batch carries beyond ``image``, defined once for everyone who reads them: the
masking transforms write them, the engines move them to the device, the losses and the TensorBoard panels read them.
"""

__all__ = ["MaskKeys"]


class MaskKeys:
    """Names of the items that ``TwoLevelMaskd`` (and ``TwoLevelMask``) write and ``HybridMIMLoss`` reads."""

    TARGET = "target"
    MASK = "mask"
    COUNT = "mask_count"
    LOCATION = "mask_location"
