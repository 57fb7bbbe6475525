//! Coalesced reading of a busy watch stream. Every kubelet status write of every Node reaches
//! every twilld as its own watch event; read one by one, 500 a second (5,000 Nodes) cost a
//! socket read, a TCP ACK and a task wake-up each, most of their CPU. `Paced` rests for a short
//! while after each burst it has handed out, so what arrives meanwhile is read in one go. An
//! event after a quiet spell is not delayed at all; one arriving within `rest` of a burst waits
//! at most `rest`. Only items `paces` picks start a rest (a watch's events, not the pages of its
//! initial list, which would otherwise wait between pages).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::time::Sleep;

pub struct Paced<S: Stream> {
    inner: Pin<Box<S>>,
    rest: Duration,
    resting: Option<Pin<Box<Sleep>>>,
    /// The inner stream had nothing after a burst: if it still has nothing when this ends, the
    /// burst is over. A client's body hands over one chunk at a time and its connection task
    /// needs a turn to read the next, so one empty poll does not mean the socket is empty.
    settling: Option<Pin<Box<Sleep>>>,
    paces: fn(&S::Item) -> bool,
    /// A paced item was handed out since the last rest.
    burst: bool,
}

/// Long enough for another task to run: a burst that continues within this is one burst.
const SETTLE: Duration = Duration::from_millis(2);

impl<S: Stream> Paced<S> {
    pub fn new(inner: S, rest: Duration, paces: fn(&S::Item) -> bool) -> Self {
        Paced {
            inner: Box::pin(inner),
            rest,
            resting: None,
            settling: None,
            paces,
            burst: false,
        }
    }
}

/// Polls `sleep` (registering the waker); true once it has ended.
fn ended(sleep: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> bool {
    sleep.as_mut().poll(cx).is_ready()
}

impl<S: Stream> Stream for Paced<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if let Some(rest) = self.resting.as_mut() {
            // An event during the rest wakes this task once, to no effect.
            if !ended(rest, cx) {
                return Poll::Pending;
            }
            self.resting = None;
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(item)) => {
                self.settling = None;
                self.burst |= (self.paces)(&item);
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if !self.burst || self.rest.is_zero() => Poll::Pending,
            Poll::Pending => {
                let this = &mut *self;
                let settle = this
                    .settling
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(SETTLE)));
                if !ended(settle, cx) {
                    return Poll::Pending;
                }
                // Nothing came while settling: the burst is over; rest before reading again.
                this.settling = None;
                this.burst = false;
                let mut rest = Box::pin(tokio::time::sleep(this.rest));
                if !ended(&mut rest, cx) {
                    this.resting = Some(rest);
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use futures::StreamExt;
    use tokio::time::Instant;

    // Tokio's paused clock: the times below are exact.
    fn paced(
        rest_ms: u64,
    ) -> (
        mpsc::UnboundedSender<u32>,
        Paced<mpsc::UnboundedReceiver<u32>>,
    ) {
        let (tx, rx) = mpsc::unbounded();
        // Odd numbers do not start a rest.
        (
            tx,
            Paced::new(rx, Duration::from_millis(rest_ms), |i| i % 2 == 0),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_comes_out_at_once_and_the_next_event_waits_out_the_rest() {
        let (tx, mut s) = paced(20);
        for i in 0..3 {
            tx.unbounded_send(i).unwrap();
        }
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(s.next().await, Some(i));
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
        // Nothing ready: once settled (nothing more within SETTLE) the rest starts; an event
        // sent 5 ms in comes out when it ends.
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sender.unbounded_send(3).unwrap();
            sender.unbounded_send(4).unwrap();
        });
        let rested = SETTLE + Duration::from_millis(20);
        assert_eq!(s.next().await, Some(3));
        assert_eq!(t0.elapsed(), rested);
        assert_eq!(s.next().await, Some(4));
        assert_eq!(t0.elapsed(), rested);
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_after_a_quiet_spell_is_not_delayed() {
        let (tx, mut s) = paced(20);
        tx.unbounded_send(0).unwrap();
        assert_eq!(s.next().await, Some(0));
        // Rest (20 ms) passes with nothing; the next event 100 ms later comes out at once.
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sender.unbounded_send(2).unwrap();
        });
        let t0 = Instant::now();
        assert_eq!(s.next().await, Some(2));
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
        drop(tx);
        assert_eq!(s.next().await, None);
    }

    /// An HTTP body hands over a chunk at a time, and its connection task needs a turn before
    /// the next: an inner stream that is briefly empty in the middle of a burst.
    #[tokio::test(start_paused = true)]
    async fn a_burst_handed_over_one_at_a_time_is_still_one_burst() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<u32>(0);
        let mut s = Paced::new(rx, Duration::from_millis(100), |_| true);
        tokio::spawn(async move {
            use futures::SinkExt;
            for i in 0..50 {
                tx.send(i).await.unwrap();
            }
        });
        let t0 = Instant::now();
        for i in 0..50 {
            assert_eq!(s.next().await, Some(i));
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "rested within the burst");
    }

    // On the real clock and a multi-threaded runtime, as twilld runs it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_rest_with_nothing_the_next_event_still_arrives() {
        let (tx, mut s) = paced(20);
        tx.unbounded_send(0).unwrap();
        assert_eq!(s.next().await, Some(0));
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            sender.unbounded_send(2).unwrap();
        });
        let got = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert_eq!(got, Ok(Some(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn items_that_do_not_pace_start_no_rest() {
        let (tx, mut s) = paced(20);
        tx.unbounded_send(1).unwrap();
        assert_eq!(s.next().await, Some(1));
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sender.unbounded_send(2).unwrap();
        });
        let t0 = Instant::now();
        assert_eq!(s.next().await, Some(2));
        assert_eq!(t0.elapsed(), Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_rest_is_plain_reading() {
        let (tx, mut s) = paced(0);
        tx.unbounded_send(1).unwrap();
        assert_eq!(s.next().await, Some(1));
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            sender.unbounded_send(2).unwrap();
        });
        let t0 = Instant::now();
        assert_eq!(s.next().await, Some(2));
        assert_eq!(t0.elapsed(), Duration::from_millis(1));
    }
}
