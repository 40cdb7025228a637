//! What the actions stage would decide for a sequence of requests, without touching any
//! service: the same gate and knob planning the runner uses, with every admitted action taken
//! as succeeding. `autotuner test rules` asserts these decisions (and the knob values they
//! lead to) in rule unit tests.
//!
//! Uses its siblings `gate` and `knobs`, and its parent's types.

use std::collections::BTreeMap;

use super::gate::{Ask, Gate, GateConfig, Persisted, Verdict};
use super::knobs::{self, KnobConfig, KnobState};
use super::{ActionRequest, ActionSpec, Event, Mode};

/// The simulated stage.
pub struct Simulator {
    enforce: Gate,
    rehearsal: Gate,
    cap: Mode,
    knobs: BTreeMap<String, (KnobConfig, KnobState)>,
}

impl Simulator {
    /// A stage with the default gate, every rule acting in its own mode, and `knobs` at their
    /// initial values.
    pub fn new(knobs: Vec<KnobConfig>) -> Simulator {
        Simulator {
            enforce: Gate::new(GateConfig::default(), Persisted::default(), Vec::new()),
            rehearsal: Gate::new(GateConfig::default(), Persisted::default(), Vec::new()),
            cap: Mode::Enforce,
            knobs: knobs
                .into_iter()
                .map(|c| {
                    let st = KnobState {
                        value: c.initial,
                        ..KnobState::default()
                    };
                    (c.name.clone(), (c, st))
                })
                .collect(),
        }
    }

    /// A knob's value now.
    pub fn knob(&self, name: &str) -> Option<f64> {
        self.knobs.get(name).map(|(_, s)| s.value)
    }

    /// The decision for each of the request's actions, in order (empty for a resolution).
    pub fn request(&mut self, req: &ActionRequest) -> Vec<String> {
        let instance = req.instance();
        if req.event == Event::Resolved {
            self.enforce.cleared(&instance);
            self.rehearsal.cleared(&instance);
            return Vec::new();
        }
        let mode = req.effective_mode(self.cap);
        let (mut acted, mut rehearsed) = (false, false);
        let mut out = Vec::new();
        for (i, spec) in req.actions.iter().enumerate() {
            let mut plan = None;
            if let ActionSpec::Knob(k) = spec {
                let Some((cfg, st)) = self.knobs.get(&k.name) else {
                    out.push("failed".to_owned());
                    continue;
                };
                let p = knobs::plan(cfg, st, k, req.value, req.at_ms);
                if p.after == p.before {
                    if let Some((_, st)) = self.knobs.get_mut(&k.name) {
                        st.status = p.status.to_owned();
                    }
                    out.push("unchanged".to_owned());
                    continue;
                }
                plan = Some((k.name.clone(), p));
            }
            let target = match spec {
                ActionSpec::Knob(k) => format!("knob/{}", k.name),
                other => other.kind().to_owned(),
            };
            let key = req.idempotency_key(i);
            let ask = Ask {
                instance: &instance,
                rule: &req.rule,
                mode,
                kind: spec.kind(),
                target: &target,
                key: &key,
                refused: (spec.is_destructive() && !req.allow_destructive)
                    .then(|| "needs allow_destructive".to_owned()),
            };
            let gate = if mode == Mode::DryRun {
                &mut self.rehearsal
            } else {
                &mut self.enforce
            };
            let verdict = gate.admit(&ask, req.at_ms, &mut Vec::new());
            match &verdict {
                Verdict::Apply => {
                    gate.finish(&target);
                    acted |= spec.counts_for_breaker();
                    if let Some((name, p)) = &plan
                        && let Some((_, st)) = self.knobs.get_mut(name)
                    {
                        knobs::commit(st, p, req.at_ms);
                    }
                }
                Verdict::WouldApply => rehearsed |= spec.counts_for_breaker(),
                Verdict::Skip(..) => {}
            }
            out.push(verdict.decision().to_owned());
        }
        if acted {
            self.enforce
                .acted(&instance, &req.rule, req.cooldown, req.at_ms);
        }
        if rehearsed {
            self.rehearsal
                .acted(&instance, &req.rule, req.cooldown, req.at_ms);
        }
        out
    }
}
