"""The windows of the authors' sliding-window test protocol (their `slide_inference`), in plain Python: the model's
test protocol (`protocol_denseclip.slide_logits`) and the ONNX Runtime wrapper (`onnx_inference`, which runs without
torch) place their windows, and plan how their logits are summed and averaged, with these functions."""

Rectangle = tuple[int, int, int, int]


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


def _coverage_runs(length: int, starts: list[int], size: int) -> list[tuple[int, int, int]]:
    """`(begin, end, count)`: the runs of pixels along one side covered by the same number of windows."""
    runs: list[tuple[int, int, int]] = []
    for index in range(length):
        count = sum(start <= index < start + size for start in starts)
        if runs and runs[-1][2] == count:
            runs[-1] = (runs[-1][0], index + 1, count)
        else:
            runs.append((index, index + 1, count))
    return runs


def window_accumulation(
    height: int, width: int, crop_size: tuple[int, int], stride: tuple[int, int]
) -> tuple[tuple[int, int], list[tuple[int, int]], list[list[tuple[bool, Rectangle]]], list[tuple[Rectangle, int]]]:
    """How the windows' logits are summed into an image-sized buffer and averaged, touching each pixel as few times as
    the authors' sum (`0 + w_1 + w_2 + ...` in window order, then `/ count`) allows with the same result.

    Returns `sliding_windows`' window size and corners, then for each window (in that order) the rectangles
    `(add, (top, bottom, left, right))` of its region in image coordinates: `add=False` where no earlier window wrote
    (the buffer's values are copied from the window: `0 + w == w`), `add=True` where one did. Last, the rectangles
    covered by more than one window with their count, to divide by (`w / 1 == w`: a pixel of a single window is
    final as written). With windows that overlap or touch (a stride no larger than the crop), every pixel is
    written. Windows are placed in rows that each span the whole width, so the pixels written before a window are
    the rows of the earlier rows of windows plus, in its own rows, the columns of the earlier windows of its row.
    """
    window, corners = sliding_windows(height, width, crop_size, stride)
    writes: list[list[tuple[bool, Rectangle]]] = []
    rows_done, cols_done, row_top = 0, 0, None
    for top, left in corners:
        if top != row_top:  # a new row of windows: the previous ones wrote every column of their rows
            if row_top is not None:
                rows_done = row_top + window[0]
            row_top, cols_done = top, 0
        bottom, right = top + window[0], left + window[1]
        middle = min(max(rows_done, top), bottom)  # rows [top, middle) hold an earlier row of windows
        split = min(max(cols_done, left), right)  # in rows [middle, bottom), columns [left, split) an earlier window
        parts = [(True, (top, middle, left, right)), (True, (middle, bottom, left, split))]
        parts.append((False, (middle, bottom, split, right)))
        writes.append([(add, box) for add, box in parts if box[0] < box[1] and box[2] < box[3]])
        cols_done = right
    tops = sorted({top for top, _ in corners})
    lefts = sorted({left for _, left in corners})
    divisions = [
        ((row_begin, row_end, col_begin, col_end), row_count * col_count)
        for row_begin, row_end, row_count in _coverage_runs(height, tops, window[0])
        for col_begin, col_end, col_count in _coverage_runs(width, lefts, window[1])
        if row_count * col_count > 1
    ]
    return window, corners, writes, divisions


__all__ = ["sliding_window_starts", "sliding_windows", "window_accumulation"]
