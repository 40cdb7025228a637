//! ② Rules: conditions written in PromQL, evaluated in-process over the registry's samples and
//! history.
//!
//! So far: `file` (what a rule file says), `compile` (validation with every error located),
//! `expr` (the PromQL evaluator) and `state` (the pending/firing state machine). The engine loop
//! and hot reload build on these. Uses `sample`, `registry` (read only), `yaml`, `settings` and
//! `actions::ActionSpec`; never collectors.

pub mod compile;
pub mod engine;
pub mod expr;
pub mod file;
pub mod state;
pub mod unit;
