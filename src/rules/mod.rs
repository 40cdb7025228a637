//! ② Rules: conditions written in PromQL, evaluated in-process over the registry's samples and
//! history.
//!
//! `file` (what a rule file says), `compile` (validation with every error located), `expr` (the
//! PromQL evaluator), `state` (the pending/firing state machine), `engine/` (the tick loop,
//! reload, the file watcher, persistence and the API's view) and `unit` (`test rules`). Uses `sample`, `registry` (read only), `yaml`, `settings` and
//! `actions::ActionSpec`; never collectors.

pub mod compile;
pub mod engine;
pub mod expr;
pub mod file;
pub mod source;
pub mod state;
pub mod unit;
