//! Liveness and readiness: what `/health` and `/health/ready` answer.
//!
//! They answer different questions, so a load balancer or Kubernetes acts
//! on each the right way. *Liveness* asks whether the process is still
//! doing its job: it fails (and a supervisor should restart it) only when
//! the engine thread is gone, when steps keep failing, or when there is
//! work and no step has finished for a long time (a stall). *Readiness*
//! asks whether new work should be sent here: it also fails while the
//! model loads, while the server drains for a shutdown and while it sheds
//! load after running short of memory; none of those should restart it.

use std::time::Duration;

use crate::service::ServiceHealth;

/// When the engine counts as not live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Whole steps failing in a row that make the engine not live.
    pub max_step_failures: u64,
    /// With work waiting or running, no step finishing for this long makes
    /// the engine not live (the stall watchdog).
    pub stall_timeout: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            max_step_failures: 3,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a check fails; the stable string goes into the JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unhealthy {
    /// The engine thread has ended.
    EngineStopped,
    /// Steps have failed [`HealthPolicy::max_step_failures`] times in a row.
    StepFailures,
    /// Work exists and no step has finished for the stall timeout.
    Stalled,
    /// The model is loading.
    Loading,
    /// A graceful shutdown has begun.
    Draining,
    /// Memory ran short; running requests finish first.
    Shedding,
}

impl Unhealthy {
    /// The reason as the JSON body and logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EngineStopped => "engine_stopped",
            Self::StepFailures => "step_failures",
            Self::Stalled => "stalled",
            Self::Loading => "loading",
            Self::Draining => "draining",
            Self::Shedding => "shedding",
        }
    }
}

/// Whether the engine is live.
pub fn liveness(h: &ServiceHealth, policy: &HealthPolicy) -> Result<(), Unhealthy> {
    if !h.alive {
        return Err(Unhealthy::EngineStopped);
    }
    if h.consecutive_step_failures >= policy.max_step_failures {
        return Err(Unhealthy::StepFailures);
    }
    let has_work = h.running + h.waiting + h.paused > 0;
    let stalled_ms = u64::try_from(policy.stall_timeout.as_millis()).unwrap_or(u64::MAX);
    if has_work && h.since_progress_ms >= stalled_ms {
        return Err(Unhealthy::Stalled);
    }
    Ok(())
}

/// Whether new work should be sent here.
pub fn readiness(h: &ServiceHealth, policy: &HealthPolicy) -> Result<(), Unhealthy> {
    liveness(h, policy)?;
    if h.loading {
        return Err(Unhealthy::Loading);
    }
    if h.shutting_down {
        return Err(Unhealthy::Draining);
    }
    if h.shedding {
        return Err(Unhealthy::Shedding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> ServiceHealth {
        ServiceHealth {
            alive: true,
            ..ServiceHealth::default()
        }
    }

    #[test]
    fn each_condition_fails_the_right_check_with_its_reason() {
        let p = HealthPolicy::default();
        assert_eq!(liveness(&live(), &p), Ok(()));
        assert_eq!(readiness(&live(), &p), Ok(()));
        let cases = [
            (
                ServiceHealth {
                    alive: false,
                    ..live()
                },
                Some(Unhealthy::EngineStopped),
                Unhealthy::EngineStopped,
            ),
            (
                ServiceHealth {
                    consecutive_step_failures: 3,
                    ..live()
                },
                Some(Unhealthy::StepFailures),
                Unhealthy::StepFailures,
            ),
            (
                ServiceHealth {
                    running: 1,
                    since_progress_ms: 60_000,
                    ..live()
                },
                Some(Unhealthy::Stalled),
                Unhealthy::Stalled,
            ),
            (
                ServiceHealth {
                    loading: true,
                    ..live()
                },
                None,
                Unhealthy::Loading,
            ),
            (
                ServiceHealth {
                    shutting_down: true,
                    ..live()
                },
                None,
                Unhealthy::Draining,
            ),
            (
                ServiceHealth {
                    shedding: true,
                    ..live()
                },
                None,
                Unhealthy::Shedding,
            ),
        ];
        for (health, live_verdict, ready_verdict) in cases {
            assert_eq!(liveness(&health, &p).err(), live_verdict, "{health:?}");
            assert_eq!(
                readiness(&health, &p).err(),
                Some(ready_verdict),
                "{health:?}"
            );
        }
    }

    #[test]
    fn an_idle_engine_is_never_stalled_and_a_short_gap_is_no_stall() {
        let p = HealthPolicy::default();
        let idle = ServiceHealth {
            since_progress_ms: 3_600_000,
            ..live()
        };
        assert_eq!(liveness(&idle, &p), Ok(()));
        let busy = ServiceHealth {
            waiting: 2,
            since_progress_ms: 59_999,
            ..live()
        };
        assert_eq!(liveness(&busy, &p), Ok(()));
        assert_eq!(
            readiness(
                &ServiceHealth {
                    consecutive_step_failures: 2,
                    ..live()
                },
                &p
            ),
            Ok(())
        );
    }
}
