"""The windows of the authors' sliding-window test protocol (their `slide_inference`), in plain Python: the model's
test protocol (`protocol_denseclip.slide_logits`) and the ONNX Runtime wrapper (`onnx_inference`, which runs without
torch) place their windows with these functions."""


def sliding_window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Offsets of the windows along one side of `length` pixels: one every `stride` pixels, the last one moved back to
    end at the border; a side no longer than `crop` has a single window at 0 that spans it whole."""
    if length <= crop:
        return [0]
    count = -(-(length - crop) // stride) + 1
    return [min(index * stride, length - crop) for index in range(count)]


def sliding_windows(
    height: int, width: int, crop_size: tuple[int, int], stride: tuple[int, int]
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The windows on a `height` x `width` input: their `(height, width)` (the crop, a side shorter than the crop taken
    whole, so that every window has the same size) and their `(top, left)` corners, row by row."""
    window = (min(crop_size[0], height), min(crop_size[1], width))
    corners = [
        (top, left)
        for top in sliding_window_starts(height, crop_size[0], stride[0])
        for left in sliding_window_starts(width, crop_size[1], stride[1])
    ]
    return window, corners


__all__ = ["sliding_window_starts", "sliding_windows"]
