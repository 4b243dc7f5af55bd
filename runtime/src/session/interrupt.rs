//! Stopping an ONNX Runtime call while it runs, not after it.
//!
//! A cancel or a time limit checked between steps and frame batches waits for the call in
//! flight: at CogVideoX-5B's real size one DiT step is some ten minutes on a 2-core CPU and
//! about two seconds on an H100 (batch 2), predicting a LoRA a second or more. Under an
//! [`Interrupt`] ([`Interrupt::watch`], or [`interruptible`], which polls a condition), every
//! [`crate::Model`] run on the thread registers its run options; [`Interrupt::interrupt`],
//! from any thread, sets ONNX Runtime's terminate flag on them (its executor checks the flag
//! before each node), so the call returns within a node, as [`RuntimeError::Cancelled`], and
//! every later run is refused at once.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ort::sys::OrtRunOptions;

use crate::error::RuntimeError;

/// How often `stop` is asked.
const POLL: Duration = Duration::from_millis(10);

/// One [`interruptible`] scope: whether it stopped, and the runs in flight under it.
#[derive(Default)]
struct Scope {
    /// Shared with v2l's own kernels, which check it between work items ([`v2l_kernels::stop`]).
    stopped: Arc<AtomicBool>,
    runs: Mutex<Vec<Run>>,
}

/// The run options of a call in flight.
struct Run(NonNull<OrtRunOptions>);

// SAFETY: ONNX Runtime's `RunOptionsSetTerminate` may be called from any thread while a run
// uses the options (that is its purpose); a `Run` is registered only while its options live
// ([`InFlight`] removes it first), and is used only under the scope's lock.
unsafe impl Send for Run {}

impl Scope {
    fn stop(&self) {
        let runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the lock: a run registering now sees the flag, or is terminated here.
        self.stopped.store(true, Ordering::SeqCst);
        for run in runs.iter() {
            // SAFETY: a registered run's options are live (see `Run`). A failure leaves
            // that call to finish its node and the next check between steps to stop the run.
            let status = unsafe { (ort::api().RunOptionsSetTerminate)(run.0.as_ptr()) };
            if !status.0.is_null() {
                // SAFETY: a non-null status is ONNX Runtime's to release, once.
                unsafe { (ort::api().ReleaseStatus)(status.0) };
            }
        }
    }
}

thread_local! {
    static WATCHED: RefCell<Option<Arc<Scope>>> = const { RefCell::new(None) };
}

/// A stop for the runs of one thread, given from any other: for a caller whose cancel
/// reaches code of its own ([`Interrupt::interrupt`] from a C ABI's cancel call) and who
/// keeps its callers' threads free of a second thread's handle (which [`interruptible`]
/// needs).
#[derive(Clone, Default)]
pub struct Interrupt(Arc<Scope>);

impl Interrupt {
    /// Stops the run in flight within a node and refuses every later one, each as
    /// [`RuntimeError::Cancelled`], until [`Interrupt::reset`].
    pub fn interrupt(&self) {
        self.0.stop();
    }

    /// Lets runs go again: for the next piece of work, once the stopped one has returned.
    pub fn reset(&self) {
        self.0.stopped.store(false, Ordering::SeqCst);
    }

    /// Whether [`Interrupt::interrupt`] was called since the last reset.
    pub fn interrupted(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    /// Runs `work` on this thread with every model run it makes under this interrupt.
    pub fn watch<R>(&self, work: impl FnOnce() -> R) -> R {
        v2l_kernels::stop::set_source(kernel_flag);
        let _watching = Watching {
            previous: WATCHED.with(|w| w.replace(Some(self.0.clone()))),
        };
        work()
    }
}

/// Runs `work` on this thread, asking `stop` every 10 ms from a second thread meanwhile;
/// once it answers `true`, the ONNX Runtime call `work` is in returns within a node and every
/// later one is refused, each as [`RuntimeError::Cancelled`]. What `stop` watches (a cancel
/// flag, a deadline) is the caller's; its own checks between steps stay as they are.
pub fn interruptible<R>(stop: impl Fn() -> bool + Sync, work: impl FnOnce() -> R) -> R {
    let interrupt = Interrupt::default();
    std::thread::scope(|s| {
        let (done, finished) = mpsc::channel::<()>();
        let (watcher, stop) = (interrupt.clone(), &stop);
        s.spawn(move || loop {
            match finished.recv_timeout(POLL) {
                Err(RecvTimeoutError::Timeout) if stop() => return watcher.interrupt(),
                Err(RecvTimeoutError::Timeout) => {}
                // `work` ended (or unwound): nothing more to stop.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        });
        // Dropped on return or unwind, so the watcher ends before the scope waits for it.
        let _done = done;
        interrupt.watch(work)
    })
}

/// The stop flag of this thread's scope, for v2l's kernels.
fn kernel_flag() -> Option<Arc<AtomicBool>> {
    WATCHED.with(|w| w.borrow().as_ref().map(|s| s.stopped.clone()))
}

/// Puts back the thread's previous scope, on return or unwind.
struct Watching {
    previous: Option<Arc<Scope>>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let previous = self.previous.take();
        WATCHED.with(|w| *w.borrow_mut() = previous);
    }
}

/// Whether the interrupt this thread's runs are under ([`interruptible`],
/// [`Interrupt::watch`]) has stopped them.
pub fn interrupted() -> bool {
    WATCHED.with(|w| {
        w.borrow()
            .as_ref()
            .is_some_and(|s| s.stopped.load(Ordering::SeqCst))
    })
}

/// A run registered with this thread's scope for as long as it lives.
pub(crate) struct InFlight(Option<(Arc<Scope>, NonNull<OrtRunOptions>)>);

impl InFlight {
    /// Registers the run about to use `options` (from `ort::AsPointer::ptr`), or refuses it
    /// when the scope has stopped. Outside a scope: nothing to register.
    pub(crate) fn start(options: *const OrtRunOptions) -> Result<InFlight, RuntimeError> {
        let Some(scope) = WATCHED.with(|w| w.borrow().clone()) else {
            return Ok(InFlight(None));
        };
        let Some(ptr) = NonNull::new(options.cast_mut()) else {
            return Ok(InFlight(None));
        };
        let mut runs = scope.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if scope.stopped.load(Ordering::SeqCst) {
            return Err(RuntimeError::Cancelled);
        }
        runs.push(Run(ptr));
        drop(runs);
        Ok(InFlight(Some((scope, ptr))))
    }

    /// `error` from the run, or [`RuntimeError::Cancelled`] where the scope stopped it.
    pub(crate) fn outcome(&self, error: RuntimeError) -> RuntimeError {
        match &self.0 {
            Some((scope, _)) if scope.stopped.load(Ordering::SeqCst) => RuntimeError::Cancelled,
            _ => error,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some((scope, ptr)) = self.0.take() {
            let mut runs = scope.runs.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = runs.iter().position(|r| r.0 == ptr) {
                runs.swap_remove(i);
            }
        }
    }
}
