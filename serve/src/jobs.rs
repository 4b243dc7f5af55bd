//! The job queue: a bounded FIFO of accepted jobs shared by the HTTP handlers (which push) and
//! the workers (which pop), and each unfinished job's live state (progress, cancel flag).
//!
//! The queue is in memory; the jobs themselves are in the [`Store`] first, so a restart rebuilds
//! the queue from the database ([`Jobs::new`]). Draining (SIGTERM) stops workers from taking new
//! jobs; what is queued stays queued, in the database, for the next process.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::watch;

use crate::store::{JobError, JobRecord, State, Store, StoreError};

/// A job's progress as the events stream shows it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub state: State,
    pub step: usize,
    pub steps: usize,
}

/// An unfinished job's live state.
pub struct Live {
    pub status: watch::Sender<Snapshot>,
    /// Set by `DELETE`; the worker stops after the current denoising step.
    pub cancel: AtomicBool,
}

impl Live {
    fn new(state: State) -> Arc<Live> {
        Arc::new(Live {
            status: watch::channel(Snapshot {
                state,
                step: 0,
                steps: 0,
            })
            .0,
            cancel: AtomicBool::new(false),
        })
    }
}

/// Why a job could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("the queue is full ({0} jobs waiting)")]
    Full(usize),
    #[error("the server is shutting down")]
    Draining,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `DELETE` did.
#[derive(Debug, PartialEq)]
pub enum Cancelled {
    /// It was queued and will not run.
    Queued,
    /// It is running and stops after its current step.
    Running,
    /// It had already ended in this state.
    Final(State),
    Unknown,
}

/// The job table, its queue and its persistent store.
pub struct Jobs {
    pub store: Store,
    queue: Mutex<VecDeque<String>>,
    wake: Condvar,
    live: Mutex<HashMap<String, Arc<Live>>>,
    capacity: usize,
    /// Places held by requests whose uploads are still being read or decoded.
    reserved: AtomicUsize,
    /// Jobs that ended while their end could not be written (a full disk): what `GET` shows
    /// until the store takes it.
    unrecorded: Mutex<HashMap<String, (State, JobError)>>,
    draining: AtomicBool,
    /// Set once a shutdown's grace is over: running jobs stop and are queued again.
    stopping: AtomicBool,
    running: AtomicUsize,
}

/// A place in the queue held for one request from admission until its job is queued (or it is
/// refused): a burst cannot read and decode more uploads than the queue will take.
pub struct Slot<'a> {
    jobs: &'a Jobs,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.jobs.reserved.fetch_sub(1, Ordering::SeqCst);
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single push/pop/insert: the data is consistent after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Jobs {
    /// A queue of at most `capacity` waiting jobs, holding the jobs a previous process left
    /// queued (those are accepted already, so they may exceed it).
    pub fn new(store: Store, capacity: usize, queued: Vec<String>) -> Jobs {
        let live = queued
            .iter()
            .map(|id| (id.clone(), Live::new(State::Queued)))
            .collect();
        Jobs {
            store,
            queue: Mutex::new(queued.into()),
            wake: Condvar::new(),
            live: Mutex::new(live),
            capacity,
            reserved: AtomicUsize::new(0),
            unrecorded: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            running: AtomicUsize::new(0),
        }
    }

    /// Holds a place in the queue, or refuses when queued and held places fill it or the
    /// server is draining.
    pub fn reserve(&self) -> Result<Slot<'_>, EnqueueError> {
        let q = locked(&self.queue);
        if self.draining.load(Ordering::SeqCst) {
            return Err(EnqueueError::Draining);
        }
        if q.len() + self.reserved.load(Ordering::SeqCst) >= self.capacity {
            return Err(EnqueueError::Full(q.len()));
        }
        self.reserved.fetch_add(1, Ordering::SeqCst);
        Ok(Slot { jobs: self })
    }

    /// Stores `job` and queues it in the place `slot` held, or refuses when the server began
    /// draining meanwhile.
    pub fn enqueue(&self, job: &JobRecord, _slot: Slot<'_>) -> Result<Arc<Live>, EnqueueError> {
        let mut q = locked(&self.queue);
        if self.draining.load(Ordering::SeqCst) {
            return Err(EnqueueError::Draining);
        }
        self.store.insert(job)?;
        let live = Live::new(State::Queued);
        locked(&self.live).insert(job.id.clone(), live.clone());
        q.push_back(job.id.clone());
        self.wake.notify_one();
        Ok(live)
    }

    /// The first queued job `fits` accepts, taken for a worker as [`Jobs::next`] takes one,
    /// without waiting; `None` when none fits (or draining).
    pub fn take_fitting(&self, fits: impl Fn(&str) -> bool) -> Option<(String, Arc<Live>)> {
        let mut q = locked(&self.queue);
        if self.draining.load(Ordering::SeqCst) {
            return None;
        }
        let pos = q.iter().position(|id| fits(id))?;
        let id = q.remove(pos)?;
        let live = locked(&self.live).get(&id).cloned()?;
        self.running.fetch_add(1, Ordering::SeqCst);
        Some((id, live))
    }

    /// The next job for a worker, waiting for one; `None` once draining.
    pub fn next(&self) -> Option<(String, Arc<Live>)> {
        let mut q = locked(&self.queue);
        loop {
            if self.draining.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(id) = q.pop_front() {
                let live = locked(&self.live).get(&id).cloned();
                match live {
                    Some(l) => {
                        self.running.fetch_add(1, Ordering::SeqCst);
                        return Some((id, l));
                    }
                    None => continue, // cancelled while queued
                }
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A worker is done with `id` (whatever the outcome): its final snapshot goes out to every
    /// events stream and its live state is dropped.
    pub fn finished(&self, id: &str, last: Snapshot) {
        if let Some(l) = locked(&self.live).remove(id) {
            l.status.send_replace(last);
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    /// Keeps a job's end in memory because the store could not take it; written later by
    /// [`Jobs::record_pending`].
    pub fn unrecorded(&self, id: &str, state: State, error: JobError) {
        locked(&self.unrecorded).insert(id.to_string(), (state, error));
    }

    /// Writes the ends kept in memory to the store, as far as it takes them.
    pub fn record_pending(&self) {
        let mut pending = locked(&self.unrecorded);
        pending.retain(|id, (state, error)| {
            self.store
                .finish(id, *state, &Default::default(), Some(error))
                .is_err()
        });
    }

    /// A job as clients see it: the store's record, with an end the store could not take.
    pub fn record(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let mut job = self.store.get(id)?;
        if let (Some(j), Some((state, error))) = (job.as_mut(), locked(&self.unrecorded).get(id)) {
            j.state = *state;
            j.error = Some(error.clone());
        }
        Ok(job)
    }

    pub fn live(&self, id: &str) -> Option<Arc<Live>> {
        locked(&self.live).get(id).cloned()
    }

    pub fn cancel(&self, id: &str) -> Result<Cancelled, StoreError> {
        let mut q = locked(&self.queue);
        if let Some(pos) = q.iter().position(|j| j == id) {
            q.remove(pos);
            drop(q);
            self.store.cancel_queued(id)?;
            if let Some(l) = locked(&self.live).remove(id) {
                l.status.send_replace(Snapshot {
                    state: State::Cancelled,
                    step: 0,
                    steps: 0,
                });
            }
            return Ok(Cancelled::Queued);
        }
        drop(q);
        if let Some(l) = self.live(id) {
            l.cancel.store(true, Ordering::SeqCst);
            return Ok(Cancelled::Running);
        }
        Ok(match self.record(id)? {
            Some(j) => Cancelled::Final(j.state),
            None => Cancelled::Unknown,
        })
    }

    /// Stops handing out jobs (SIGTERM): running ones finish, queued ones stay queued.
    pub fn drain(&self) {
        let _q = locked(&self.queue);
        self.draining.store(true, Ordering::SeqCst);
        self.wake.notify_all();
    }

    /// Ends a shutdown's grace (`--shutdown-grace`, or a second signal): running jobs stop
    /// within the node in flight and are queued again for the next start.
    pub fn stop_running(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether running jobs are to stop for the shutdown ([`Jobs::stop_running`]).
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn depth(&self) -> usize {
        locked(&self.queue).len()
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::form::VideoParams;
    use crate::store::JobParams;

    fn job(id: &str) -> JobRecord {
        JobRecord::queued(id, JobParams::Video(VideoParams::sample()))
    }

    #[test]
    fn bounded_fifo_with_cancel_and_drain() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let jobs = Jobs::new(store, 2, vec![]);
        jobs.enqueue(&job("a"), jobs.reserve().unwrap()).unwrap();
        jobs.enqueue(&job("b"), jobs.reserve().unwrap()).unwrap();
        assert!(matches!(jobs.reserve(), Err(EnqueueError::Full(2))));
        assert_eq!(jobs.cancel("a").unwrap(), Cancelled::Queued);
        assert_eq!(
            jobs.store.get("a").unwrap().unwrap().state,
            State::Cancelled
        );
        assert_eq!(
            jobs.cancel("a").unwrap(),
            Cancelled::Final(State::Cancelled)
        );
        assert_eq!(jobs.cancel("nope").unwrap(), Cancelled::Unknown);
        let (id, live) = jobs.next().unwrap();
        assert_eq!(id, "b");
        assert_eq!(jobs.running(), 1);
        assert_eq!(jobs.cancel("b").unwrap(), Cancelled::Running);
        assert!(live.cancel.load(Ordering::SeqCst));
        jobs.enqueue(&job("d"), jobs.reserve().unwrap()).unwrap();
        jobs.drain();
        assert!(jobs.next().is_none(), "a draining queue hands out nothing");
        assert!(matches!(jobs.reserve(), Err(EnqueueError::Draining)));
        assert_eq!(jobs.depth(), 1, "d stays queued");
    }

    #[test]
    fn held_places_count_against_the_queue_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let jobs = Jobs::new(store, 2, vec![]);
        let first = jobs.reserve().unwrap();
        let second = jobs.reserve().unwrap();
        assert!(
            matches!(jobs.reserve(), Err(EnqueueError::Full(0))),
            "two uploads being decoded fill a queue of two"
        );
        drop(first); // that request was refused
        jobs.enqueue(&job("a"), second).unwrap();
        let third = jobs.reserve().unwrap();
        assert!(matches!(jobs.reserve(), Err(EnqueueError::Full(1))));
        drop(third);
        assert!(jobs.reserve().is_ok());
    }

    #[test]
    fn a_waiting_worker_wakes_for_a_job_and_for_drain() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let jobs = Arc::new(Jobs::new(store, 4, vec![]));
        let j = jobs.clone();
        let worker = std::thread::spawn(move || {
            let mut got = vec![];
            while let Some((id, _)) = j.next() {
                got.push(id.clone());
                j.finished(
                    &id,
                    Snapshot {
                        state: State::Succeeded,
                        step: 1,
                        steps: 1,
                    },
                );
            }
            got
        });
        jobs.enqueue(&job("x"), jobs.reserve().unwrap()).unwrap();
        while jobs.running() > 0 || jobs.depth() > 0 {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        jobs.drain();
        assert_eq!(worker.join().unwrap(), vec!["x".to_string()]);
    }
}
