//! Host-to-device uploads through page-locked (pinned) memory.
//!
//! candle 0.11.1 uploads every host slice from pageable memory (`Tensor::from_slice` ->
//! `CudaDevice::storage_from_slice` -> `clone_htod`): the driver first copies it into a
//! staging buffer of its own. [`PinnedUpload`] keeps one page-locked buffer (cudarc's
//! `PinnedHostSlice`, write-combined) per stream of uploads, copies the data into it and
//! lets the DMA engine read it directly (`CudaStream::memcpy_htod`, asynchronous), then wraps
//! the device slice as a candle tensor (`CudaStorage::wrap_cuda_slice`,
//! `Tensor::from_storage`): no fork of candle. cudarc records an event after each copy
//! from the buffer, and refilling the buffer waits for it, so a batch is never overwritten
//! while its copy runs. On other devices (and without the `cuda` feature) an upload is
//! `Tensor::from_slice`. Compiled by CI, never run on a GPU yet.
use std::marker::PhantomData;

use candle::{Device, Shape, Tensor, WithDType};

/// The element types [`PinnedUpload`] takes: f32 (images) and u32 (class targets).
#[cfg(feature = "cuda")]
pub trait PinnedDType:
    WithDType
    + candle::cuda_backend::CudaDType
    + candle::cuda_backend::cudarc::driver::DeviceRepr
    + candle::cuda_backend::cudarc::driver::ValidAsZeroBits
{
}

/// The element types [`PinnedUpload`] takes: f32 (images) and u32 (class targets).
#[cfg(not(feature = "cuda"))]
pub trait PinnedDType: WithDType {}

impl PinnedDType for f32 {}
impl PinnedDType for u32 {}

/// A reusable page-locked staging buffer for uploads of `T` (see the module docs); keep one
/// per kind of upload (a batch's images, its targets) for the whole run: allocating pinned
/// memory is slow, reusing it is free.
///
/// ```
/// use candle::Device;
/// use keel_kernels::PinnedUpload;
/// let mut images = PinnedUpload::<f32>::new();
/// let x = images.upload(&[1.0, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu)?;
/// assert_eq!(x.to_vec2::<f32>()?, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
/// assert!(images.upload(&[1.0, 2.0, 3.0], (2, 2), &Device::Cpu).is_err());
/// # Ok::<(), candle::Error>(())
/// ```
pub struct PinnedUpload<T: PinnedDType> {
    #[cfg(feature = "cuda")]
    buf: Option<candle::cuda_backend::cudarc::driver::PinnedHostSlice<T>>,
    _t: PhantomData<T>,
}

impl<T: PinnedDType> Default for PinnedUpload<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: PinnedDType> PinnedUpload<T> {
    /// An upload with no buffer yet (allocated on the first CUDA upload, and again when
    /// the length changes).
    pub fn new() -> Self {
        Self {
            #[cfg(feature = "cuda")]
            buf: None,
            _t: PhantomData,
        }
    }

    /// `data` as a tensor of `shape` on `dev`: through the pinned buffer on CUDA,
    /// `Tensor::from_slice` elsewhere. Errors when `data` does not fill `shape`.
    pub fn upload(
        &mut self,
        data: &[T],
        shape: impl Into<Shape>,
        dev: &Device,
    ) -> candle::Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            candle::bail!(
                "PinnedUpload::upload: {} values for shape {shape:?} ({} elements); pass the data of one whole tensor",
                data.len(),
                shape.elem_count()
            )
        }
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => self.upload_cuda(data, shape, d),
            _ => Tensor::from_slice(data, shape, dev),
        }
    }

    #[cfg(feature = "cuda")]
    fn upload_cuda(
        &mut self,
        data: &[T],
        shape: Shape,
        dev: &candle::cuda_backend::CudaDevice,
    ) -> candle::Result<Tensor> {
        let stream = dev.cuda_stream();
        if self.buf.as_ref().is_none_or(|b| b.len() != data.len()) {
            // SAFETY: the buffer is uninitialised until the copy_from_slice below writes all
            // `data.len()` elements; nothing reads it before.
            let buf = unsafe { stream.context().alloc_pinned::<T>(data.len()) };
            self.buf = Some(buf.map_err(candle::Error::wrap)?);
        }
        let Some(buf) = self.buf.as_mut() else {
            candle::bail!("PinnedUpload: no pinned buffer after allocating one")
        };
        // Waits for the previous copy out of the buffer (cudarc's event), then refills it.
        buf.as_mut_slice()
            .map_err(candle::Error::wrap)?
            .copy_from_slice(data);
        // SAFETY: `dst` has `data.len()` elements and the copy below, on the same stream
        // as every later kernel, writes all of them before anything reads it.
        let mut dst = unsafe { stream.alloc::<T>(data.len()) }.map_err(candle::Error::wrap)?;
        stream
            .memcpy_htod(buf, &mut dst)
            .map_err(candle::Error::wrap)?;
        let storage = candle::cuda_backend::CudaStorage::wrap_cuda_slice(dst, dev.clone());
        Ok(Tensor::from_storage(
            candle::Storage::Cuda(storage),
            shape,
            candle::op::BackpropOp::none(),
            false,
        ))
    }
}
