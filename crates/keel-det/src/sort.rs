//! PyTorch's CPU `sort(descending=True)` order, ties included.
//!
//! `torchvision.ops.batched_nms`, past 1000 boxes, orders the kept indices with
//! `scores[keep].sort(descending=True)`, which on CPU is libstdc++'s `std::sort`: an
//! introsort (median-of-three quicksort down to runs of 16, a heap-sort fallback past depth
//! `2 * floor(log2 n)`, a final insertion sort). It is not stable, so equal scores come out
//! in an order only that algorithm reproduces. This module replicates it step for step (libstdc++'s
//! `__introsort_loop`, `__move_median_to_first`, `__unguarded_partition`,
//! `__final_insertion_sort`, `__adjust_heap`), so the order, and therefore NMS's result, is
//! identical. The tests compare it with `torch.sort` on tie-heavy inputs and on an
//! adversarial input that reaches the heap-sort fallback.

/// libstdc++'s `_S_threshold`: introsort stops partitioning below this many elements.
const THRESHOLD: usize = 16;

/// Sorts `v` in place exactly as libstdc++'s `std::sort(v.begin(), v.end(), less)` does,
/// equal elements included. `less` must be a strict weak order.
pub(crate) fn std_sort_by<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], less: F) {
    let n = v.len();
    if n > 1 {
        let depth = 2 * n.ilog2() as usize;
        introsort_loop(v, 0, n, depth, &less);
        final_insertion_sort(v, &less);
    }
}

fn introsort_loop<T: Copy, F: Fn(&T, &T) -> bool>(
    v: &mut [T],
    first: usize,
    mut last: usize,
    mut depth: usize,
    less: &F,
) {
    while last - first > THRESHOLD {
        if depth == 0 {
            heap_sort(&mut v[first..last], less);
            return;
        }
        depth -= 1;
        let mid = first + (last - first) / 2;
        move_median_to_first(v, first, first + 1, mid, last - 1, less);
        let cut = unguarded_partition(v, first + 1, last, first, less);
        introsort_loop(v, cut, last, depth, less);
        last = cut;
    }
}

/// Swaps the median of `v[a]`, `v[b]`, `v[c]` into `v[result]`, with libstdc++'s exact
/// comparison sequence (which of equal candidates wins matters for ties).
fn move_median_to_first<T: Copy, F: Fn(&T, &T) -> bool>(
    v: &mut [T],
    result: usize,
    a: usize,
    b: usize,
    c: usize,
    less: &F,
) {
    let pick = if less(&v[a], &v[b]) {
        if less(&v[b], &v[c]) {
            b
        } else if less(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if less(&v[a], &v[c]) {
        a
    } else if less(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(result, pick);
}

/// Hoare partition around `v[pivot]` of `v[first..last]`; both scans stop on equal
/// elements, and the sentinel guarantees they stay in bounds.
fn unguarded_partition<T: Copy, F: Fn(&T, &T) -> bool>(
    v: &mut [T],
    mut first: usize,
    mut last: usize,
    pivot: usize,
    less: &F,
) -> usize {
    loop {
        while less(&v[first], &v[pivot]) {
            first += 1;
        }
        last -= 1;
        while less(&v[pivot], &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

fn final_insertion_sort<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], less: &F) {
    if v.len() > THRESHOLD {
        insertion_sort(&mut v[..THRESHOLD], less);
        for i in THRESHOLD..v.len() {
            unguarded_linear_insert(v, i, less);
        }
    } else {
        insertion_sort(v, less);
    }
}

fn insertion_sort<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], less: &F) {
    for i in 1..v.len() {
        if less(&v[i], &v[0]) {
            let x = v[i];
            v.copy_within(0..i, 1);
            v[0] = x;
        } else {
            unguarded_linear_insert(v, i, less);
        }
    }
}

/// Moves `v[last]` left past every element it is less than; an element not greater than
/// it exists to its left (the caller guarantees it), so no bounds check is needed.
fn unguarded_linear_insert<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], mut last: usize, less: &F) {
    let x = v[last];
    while less(&x, &v[last - 1]) {
        v[last] = v[last - 1];
        last -= 1;
    }
    v[last] = x;
}

/// libstdc++'s `__adjust_heap` (with its `__push_heap`) on the heap `v[..len]`.
fn adjust_heap<T: Copy, F: Fn(&T, &T) -> bool>(
    v: &mut [T],
    mut hole: usize,
    len: usize,
    x: T,
    less: &F,
) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if less(&v[child], &v[child - 1]) {
            child -= 1;
        }
        v[hole] = v[child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[hole] = v[child - 1];
        hole = child - 1;
    }
    while hole > top {
        let parent = (hole - 1) / 2;
        if !less(&v[parent], &x) {
            break;
        }
        v[hole] = v[parent];
        hole = parent;
    }
    v[hole] = x;
}

/// `std::__partial_sort(first, last, last)`: `make_heap` then `sort_heap`.
fn heap_sort<T: Copy, F: Fn(&T, &T) -> bool>(v: &mut [T], less: &F) {
    let n = v.len();
    if n < 2 {
        return;
    }
    let mut parent = (n - 2) / 2;
    loop {
        adjust_heap(v, parent, n, v[parent], less);
        if parent == 0 {
            break;
        }
        parent -= 1;
    }
    let mut last = n;
    while last > 1 {
        last -= 1;
        let x = v[last];
        v[last] = v[0];
        adjust_heap(v, 0, last, x, less);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The indices of `scores` in the order of PyTorch's CPU `scores.sort(descending=True)`.
    fn argsort_descending(scores: &[f64]) -> Vec<usize> {
        let mut pairs: Vec<(f64, usize)> = scores.iter().copied().zip(0..).collect();
        std_sort_by(&mut pairs, |a, b| a.0 > b.0);
        pairs.into_iter().map(|(_, i)| i).collect()
    }

    #[test]
    fn order_is_torchs_on_ties_sorted_inputs_and_the_heap_fallback() -> candle::Result<()> {
        // Fixtures from tests/fixtures/gen_det_ops.py: `scores.sort(dim=0, descending=True)`
        // of torch 2.15 (CPU); `adversary` is McIlroy's antiqsort input, which reaches the
        // heap-sort fallback.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/det_ops.safetensors"
        );
        let fx = candle::safetensors::load(path, &candle::Device::Cpu)?;
        for case in ["n16", "n17", "ties2000", "asc", "desc", "adversary"] {
            let scores = fx[&format!("sort.{case}.scores")].to_dtype(candle::DType::F64)?;
            let want = fx[&format!("sort.{case}.order")].to_vec1::<i64>()?;
            let got = argsort_descending(&scores.to_vec1::<f64>()?);
            let got: Vec<i64> = got.into_iter().map(|i| i as i64).collect();
            assert_eq!(got, want, "sort order of {case}");
        }
        Ok(())
    }

    #[test]
    fn the_fixture_orders_are_not_stable() -> candle::Result<()> {
        // Otherwise the test above could not tell this sort from a stable one.
        let scores: Vec<f64> = (0..17).map(|i| (i % 3) as f64).collect();
        let order = argsort_descending(&scores);
        let mut stable: Vec<usize> = (0..17).collect();
        stable.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        assert_ne!(order, stable);
        Ok(())
    }

    #[test]
    fn heap_fallback_sorts() {
        let mut v: Vec<i32> = (0..200).map(|i| (i * 37) % 101).collect();
        heap_sort(&mut v, &|a: &i32, b: &i32| a < b);
        assert!(v.windows(2).all(|w| w[0] <= w[1]));
    }
}
