//! A progress line on stderr while something slow happens (a large deploy uploading and
//! compiling). Only on a terminal; it appears after a short delay, so quick work shows nothing,
//! and it erases itself when done.

use std::io::Write as _;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
const FRAME_INTERVAL: Duration = Duration::from_millis(100);
/// Work that ends sooner than this shows no spinner at all.
const DELAY: Duration = Duration::from_millis(300);

/// A running spinner; [`Spinner::finish`] erases it.
#[derive(Debug)]
pub struct Spinner {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Spinner {
    /// Starts a spinner with `message` if `enabled` (stderr is a terminal); otherwise does nothing.
    pub fn start(enabled: bool, message: String) -> Spinner {
        if !enabled {
            return Spinner { stop: None, task: None };
        }
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            tokio::select! {
                _ = &mut stopped => return,
                () = tokio::time::sleep(DELAY) => {}
            }
            let mut ticks = tokio::time::interval(FRAME_INTERVAL);
            for frame in FRAMES.iter().cycle() {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticks.tick() => {
                        let elapsed = started.elapsed().as_secs_f64();
                        let mut err = std::io::stderr().lock();
                        let _ = write!(err, "\r\x1b[2K{frame} {message} {elapsed:.1}s");
                        let _ = err.flush();
                    }
                }
            }
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        });
        Spinner {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the spinner and erases its line.
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}
