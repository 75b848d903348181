//! Time spent in marked spans of a device's work (a frozen teacher's forward pass, say), measured
//! without draining the device's queue at each span.
//!
//! Timing a span with the host's clock on a GPU needs a synchronisation at its start and at its
//! end: two waits per training step, each leaving the GPU idle while the host queues the next
//! work. On a CUDA device a [`SpanClock`] records a pair of CUDA events on candle's stream
//! instead and reads their elapsed time only when asked ([`SpanClock::seconds`]), which the
//! trainer does once per epoch, where it waits for the device anyway. On the CPU, where an op
//! has finished when it returns, the host's clock times each span directly.
use std::time::Instant;

use candle_core::{bail, Device, Result};

/// One end of a span.
enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

/// Accumulates the time of spans of work on one device.
pub struct SpanClock {
    device: Device,
    open: Option<Mark>,
    /// Spans whose end the device may not have reached yet (CUDA).
    pending: Vec<(Mark, Mark)>,
    /// Seconds of the spans already read.
    seconds: f64,
}

impl SpanClock {
    /// A clock for work on `device`, at zero.
    pub fn new(device: &Device) -> Self {
        SpanClock {
            device: device.clone(),
            open: None,
            pending: Vec::new(),
            seconds: 0.0,
        }
    }

    /// Runs `f` as one span: the device work it queues is timed, from what was queued before
    /// it having finished to what it queued having finished. A failing `f` adds nothing.
    pub fn time<R, E: From<candle_core::Error>>(
        &mut self,
        f: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        self.start()?;
        match f() {
            Ok(out) => {
                self.stop()?;
                Ok(out)
            }
            Err(e) => {
                self.open = None;
                Err(e)
            }
        }
    }

    /// Opens a span. Errs if one is open.
    pub fn start(&mut self) -> Result<()> {
        if self.open.is_some() {
            bail!("SpanClock::start: a span is already open");
        }
        self.open = Some(self.mark()?);
        Ok(())
    }

    /// Closes the open span. Errs if none is open.
    pub fn stop(&mut self) -> Result<()> {
        let Some(start) = self.open.take() else {
            bail!("SpanClock::stop: no span is open");
        };
        let end = self.mark()?;
        match (&start, &end) {
            (Mark::Host(a), Mark::Host(b)) => self.seconds += (*b - *a).as_secs_f64(),
            #[cfg(feature = "cuda")]
            _ => self.pending.push((start, end)),
        }
        Ok(())
    }

    /// Total seconds of the closed spans; on CUDA waits until the device has reached the last
    /// span's end.
    pub fn seconds(&mut self) -> Result<f64> {
        for (start, end) in self.pending.drain(..) {
            self.seconds += span_seconds(&start, &end)?;
        }
        Ok(self.seconds)
    }

    /// Marks the present point of the device's queue: a timing event on CUDA; elsewhere the
    /// host's clock once the device has finished what is queued.
    fn mark(&self) -> Result<Mark> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            use candle_core::cuda_backend::WrapErr;
            let event = d
                .cuda_stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .w()?;
            return Ok(Mark::Cuda(event));
        }
        self.device.synchronize()?;
        Ok(Mark::Host(Instant::now()))
    }
}

fn span_seconds(start: &Mark, end: &Mark) -> Result<f64> {
    match (start, end) {
        (Mark::Host(a), Mark::Host(b)) => Ok((*b - *a).as_secs_f64()),
        #[cfg(feature = "cuda")]
        (Mark::Cuda(a), Mark::Cuda(b)) => {
            use candle_core::cuda_backend::WrapErr;
            Ok(a.elapsed_ms(b).w()? as f64 / 1e3)
        }
        #[cfg(feature = "cuda")]
        _ => bail!("SpanClock: a span's ends were marked on different kinds of device"),
    }
}

#[cfg(test)]
mod tests {
    use super::SpanClock;
    use candle_core::{Device, Tensor};

    #[test]
    fn sums_the_spans_and_refuses_unbalanced_marks() {
        let mut clock = SpanClock::new(&Device::Cpu);
        assert_eq!(clock.seconds().unwrap(), 0.0);
        let x = Tensor::ones((64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        for _ in 0..3 {
            let y = clock.time(|| x.matmul(&x)).unwrap();
            assert_eq!(y.dims(), &[64, 64]);
        }
        let after_three = clock.seconds().unwrap();
        assert!(after_three > 0.0);
        // Time outside a span is not counted (a generous bound: a semantic check, not a timing).
        std::thread::sleep(std::time::Duration::from_millis(300));
        clock.time(|| candle_core::Result::Ok(())).unwrap();
        let after_four = clock.seconds().unwrap();
        assert!(after_four >= after_three && after_four - after_three < 0.15);
        let e = clock.stop().unwrap_err().to_string();
        assert!(e.contains("no span is open"), "{e}");
        clock.start().unwrap();
        let e = clock.start().unwrap_err().to_string();
        assert!(e.contains("already open"), "{e}");
    }

    #[test]
    fn a_failing_span_adds_nothing_and_closes() {
        let mut clock = SpanClock::new(&Device::Cpu);
        let r: candle_core::Result<()> = clock.time(|| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            candle_core::bail!("boom")
        });
        assert!(r.unwrap_err().to_string().contains("boom"));
        assert_eq!(clock.seconds().unwrap(), 0.0);
        clock.time(|| candle_core::Result::Ok(())).unwrap();
    }
}
