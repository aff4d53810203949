//! The verification itself: runs the original model and the edited one (or the original under ablation
//! hooks, to preview a direction) on the harmful and harmless evaluation prompts and assembles a [`Report`].
//!
//! What is measured, and on what (method.md §3, §5, §7, §8):
//! - refusal rates: greedy completions (end of turn or `max_new_tokens`), judged by the substring judge;
//! - mean refusal scores from the last-position logits of the same prompts;
//! - first-token KL(original ‖ edited) on the harmless prompts (method.md §5 formula);
//! - teacher-forced cross-entropy of both models on the original's own harmless completions;
//! - induced refusal: the original on the harmless prompts with the direction added at its layer;
//! - equivalence of the edited checkpoint to the hooks its manifest claims (first prompts of both sets).
//!
//! Every prompt set is run in fixed batches through `eval` (the shared chat prefix computed once). Never
//! changes a model, never writes a file, never prints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use eval::{CompleteOptions, Judge, PromptSet};
use model::{Finish, Hook, Interventions, Model, NoHook, Record};
use serde_json::json;

use crate::equivalence::{Caveat, Claim, equivalence};
use crate::gate::{Gates, Measured};
use crate::manifest::EditRecord;
use crate::report::{Arm, Completion, Damage, DirectionInfo, EquivalenceReport, Induced, Report, SetReport, Source};
use crate::streams::{self, Tick};
use crate::{Error, Loss, Result};

/// Chunks of the guided harmless completions, shared out between the two streams.
const GUIDED_CHUNKS: usize = 8;

/// How to verify.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// method.md §8 (the reference run used 64; the paper 512).
    pub max_new_tokens: usize,
    /// Prompts per forward pass or generation batch.
    pub batch_size: usize,
    /// Prompts of each set (the first ones) for the equivalence check.
    pub equivalence_prompts: usize,
    /// Measure the cross-entropy on the original's harmless completions.
    pub cross_entropy: bool,
    /// Measure refusal induced by adding the direction (needs its layer).
    pub induce: bool,
    /// The activation addition coefficient (method.md §7: +1 induces).
    pub coeff: f64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            max_new_tokens: 64,
            batch_size: 64,
            equivalence_prompts: 16,
            cross_entropy: true,
            induce: true,
            coeff: 1.0,
        }
    }
}

/// The direction under test.
#[derive(Clone, Debug, PartialEq)]
pub struct Direction {
    /// The raw vector (any norm; activation addition uses it as is).
    pub values: Vec<f64>,
    /// The layer it was found at (activation addition goes there).
    pub layer: Option<usize>,
    pub info: DirectionInfo,
}

/// The hooks an edit equals, built by the caller from the edit's own plan (`edit::Plan::write_ops`, the
/// hooks `optimize` measures its trials with): for edits that one direction and one scale cannot state
/// (layer kernels, per-layer directions, subspaces), whose manifest claim would only give a
/// [`crate::equivalence::Caveat::Variant`]. The equivalence check then compares the checkpoint with these.
#[derive(Clone)]
pub struct EditHooks {
    pub hooks: Interventions,
    /// Projections at scale 1 only (idempotent): the along/besides split applies.
    pub idempotent: bool,
    /// What the hooks are, for the report.
    pub what: String,
    /// Where they still differ from the edit by design ([`Caveat::NormPreserving`]).
    pub caveat: Option<Caveat>,
}

impl EditHooks {
    /// The hooks of `plan` with its directions ([`crate::equivalence::plan_hooks`]), described by `what`;
    /// a norm-preserving plan carries its caveat.
    pub fn of_plan(
        ckpt: &checkpoint::Checkpoint,
        plan: &edit::Plan,
        directions: &direction::Directions,
        what: String,
    ) -> Result<EditHooks> {
        let (hooks, idempotent) = crate::equivalence::plan_hooks(ckpt, plan, directions)?;
        let caveat = plan.options.norm_preserving.then_some(Caveat::NormPreserving);
        Ok(EditHooks { hooks, idempotent, what, caveat })
    }
}

/// The hooks an edited checkpoint is compared with.
#[derive(Clone, Copy)]
enum Against<'a> {
    /// The edit's own ([`EditHooks`]).
    Own(&'a EditHooks),
    /// Those its manifest claims, for the direction.
    Claim(&'a Direction),
}

/// What is compared with the original.
pub enum Subject<'a> {
    /// An edited checkpoint, with its manifest if it has one.
    Edited { model: &'a Model, path: String, record: Option<Box<EditRecord>> },
    /// The original under directional ablation of the direction (a preview; needs a direction).
    Hooks,
}

/// A prompt set, formatted.
pub struct Set {
    pub prompts: PromptSet,
    /// Chat-formatted token ids, one per prompt.
    pub ids: Vec<Vec<u32>>,
}

/// Everything `verify` reads.
pub struct Inputs<'a> {
    pub original: &'a Model,
    pub original_path: String,
    pub chat: &'a chat::Chat,
    pub subject: Subject<'a>,
    pub direction: Option<Direction>,
    pub harmful: Set,
    pub harmless: Set,
    pub judge: &'a Judge,
    /// Refusal token ids for the refusal score; None: detected from the original's first-token
    /// distributions on the two sets (reported).
    pub refusal_tokens: Option<Vec<u32>>,
    /// Settings to record (system prompt, template, command), merged into the report's.
    pub settings: serde_json::Value,
    /// The edit's own hooks for the equivalence check (None: the hooks its manifest claims, which need
    /// `direction`).
    pub edit_hooks: Option<EditHooks>,
}

/// Progress by stage: `stage(name, total)` then `advance(done)` with the count done so far.
pub trait Progress {
    fn stage(&mut self, _name: &str, _total: usize) {}
    fn advance(&mut self, _done: usize) {}
}

/// No progress display.
pub struct Quiet;
impl Progress for Quiet {}

/// The label of the compared run in reports.
fn subject_label(s: &Subject<'_>) -> &'static str {
    match s {
        Subject::Edited { .. } => "edited",
        Subject::Hooks => "ablation (hooks)",
    }
}

/// Runs everything and checks `gates`.
pub fn verify(inputs: &Inputs<'_>, opts: &Options, gates: &Gates, progress: &mut dyn Progress) -> Result<Report> {
    let started = Instant::now();
    let original = inputs.original;
    let (layers, hidden, vocab) = (original.arch().layers, original.arch().hidden, original.arch().vocab);
    if inputs.harmful.ids.is_empty() || inputs.harmless.ids.is_empty() {
        return Err(Error::Input("verify needs at least one harmful and one harmless prompt".into()));
    }
    if let Some(d) = &inputs.direction
        && d.values.len() != hidden
    {
        return Err(Error::Input(format!(
            "the direction has length {} but the model's hidden size is {hidden}",
            d.values.len()
        )));
    }
    let ablation = match (&inputs.subject, &inputs.direction) {
        (Subject::Hooks, Some(d)) => Some(Interventions::ablation(layers, &d.values)?),
        (Subject::Hooks, None) => return Err(Error::Input("a preview on hooks needs a direction".into())),
        _ => None,
    };
    // The compared run: the edited model as it is, or the original under the hooks (a fresh hook for each
    // job, so that jobs can run at once).
    let subject_model: &Model = match &inputs.subject {
        Subject::Edited { model, .. } => model,
        Subject::Hooks => original,
    };
    let subject_hook = || -> Box<dyn Hook> {
        match &ablation {
            Some(h) => Box::new(h.clone()),
            None => Box::new(NoHook),
        }
    };
    let label = subject_label(&inputs.subject);

    // Harmful completions, and harmless ones under activation addition, are judged for refusal only: each
    // ends where the judge has decided it is a refusal (the same verdict; `eval::CompleteOptions`).
    // The harmless ones are kept whole (the cross-entropy and over-refusal examples read them).
    let copts = |record: Record, judged_only: bool| CompleteOptions {
        max_new_tokens: opts.max_new_tokens,
        batch_size: opts.batch_size.max(1),
        record,
        until_refusal: judged_only.then_some(inputs.judge),
        stop_at_refusals: None,
    };
    let first = Record { first_logits: true, logprobs: false };
    let on_record = Record { first_logits: true, logprobs: opts.cross_entropy };
    let induce_at = inputs.direction.as_ref().and_then(|d| d.layer.map(|l| (d, l))).filter(|_| opts.induce);
    // What the edited checkpoint is compared with: the edit's own hooks, else its claim's for the direction.
    let equivalence_input = match (&inputs.subject, &inputs.edit_hooks, &inputs.direction) {
        (Subject::Edited { model, record, .. }, Some(h), _) => Some((*model, record, Against::Own(h))),
        (Subject::Edited { model, record, .. }, None, Some(d)) => Some((*model, record, Against::Claim(d))),
        _ => None,
    };
    let k_equivalence = opts.equivalence_prompts.max(1);
    let n_equivalence = inputs.harmful.ids.len().min(k_equivalence) + inputs.harmless.ids.len().min(k_equivalence);

    // Greedy completions. Each run's first step is the prompts' last-position logits: the refusal scores
    // (both sets, both runs) and the first-token KL (harmless) come from them, and the original's
    // harmless completions keep the log-probability of every token (its cross-entropy on them). The
    // compared run's harmless completions are guided by the original's (`eval::complete_guided`): one
    // teacher-forced pass scores those (the compared run's cross-entropy on them) and gives the compared
    // run's own greedy tokens for as long as they agree, so only the rest is generated step by step.
    // The jobs run as two streams at once, each on half of the threads: the original's harmless
    // completions, and the harmful ones of both runs, the induced refusal and the equivalence check; then
    // both take chunks of the guided completions until none is left. A generation step is too small to
    // keep two threads busy without waiting for each other; two independent streams are not, and every
    // result is the same bits whatever the threads and the chunks (the runtime's promise).
    let (n_harmful, n_harmless) = (inputs.harmful.ids.len(), inputs.harmless.ids.len());
    let total = 2 * n_harmful
        + 2 * n_harmless
        + induce_at.map_or(0, |_| n_harmless)
        + equivalence_input.map_or(0, |_| n_equivalence);
    // One set's completions, timed under `generate NAME`, counted on the stream's progress.
    let complete_timed = |tick: &Tick,
                          seconds: &mut BTreeMap<String, f64>,
                          name: &str,
                          model: &Model,
                          hook: &mut dyn Hook,
                          set: &Set,
                          copts: CompleteOptions<'_>| {
        let t = Instant::now();
        let mut ticker = tick.counter();
        let out = eval::complete(model, inputs.chat, &set.ids, &copts, hook, &mut |n| ticker(n))?;
        seconds.insert(format!("generate {name}"), t.elapsed().as_secs_f64());
        Ok::<_, Error>(out)
    };
    // The compared run's guided harmless completions, in chunks that either stream takes when it is free
    // (stream a once the original's completions are done, stream b after its own jobs): the two streams
    // then end together. Results by chunk; the same bits whatever the chunking (batch invariance).
    let chunk = n_harmless.div_ceil(GUIDED_CHUNKS).clamp(1, opts.batch_size.max(1));
    let n_chunks = n_harmless.div_ceil(chunk);
    let next_chunk = AtomicUsize::new(0);
    type Guided = (Vec<eval::Completion>, Vec<Vec<f64>>);
    let guided: Mutex<Vec<Option<Guided>>> = Mutex::new((0..n_chunks).map(|_| None).collect());
    // The original's harmless completions, from stream a to stream b (none if stream a fails first).
    let (to_b, from_a) = mpsc::channel::<Vec<Vec<u32>>>();
    let take_chunks = |tick: &Tick, seconds: &mut BTreeMap<String, f64>, key: String, guides: &[Vec<u32>]| {
        let (t, mut ran) = (Instant::now(), false);
        let mut hook = subject_hook();
        loop {
            let i = next_chunk.fetch_add(1, Ordering::Relaxed);
            if i >= n_chunks {
                break;
            }
            let range = i * chunk..((i + 1) * chunk).min(n_harmless);
            let mut ticker = tick.counter();
            let out = eval::complete_guided(
                subject_model,
                inputs.chat,
                &inputs.harmless.ids[range.clone()],
                &guides[range],
                &copts(first, false),
                hook.as_mut(),
                &mut |n| ticker(n),
            )?;
            guided.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(out);
            ran = true;
        }
        if ran {
            seconds.insert(key, t.elapsed().as_secs_f64());
        }
        Ok::<_, Error>(())
    };
    let (stream_a, stream_b) = streams::two(
        progress,
        "completions, cross-entropy, equivalence",
        total,
        |tick: &Tick| {
            // Owned here: stream b learns of a failure here as the channel's end.
            let to_b = to_b;
            let mut seconds = BTreeMap::new();
            let g_on = complete_timed(
                tick,
                &mut seconds,
                "original harmless",
                original,
                &mut NoHook,
                &inputs.harmless,
                copts(on_record, false),
            )?;
            let guides: Vec<Vec<u32>> = g_on.iter().map(|g| g.tokens.clone()).collect();
            let _ = to_b.send(guides.clone());
            take_chunks(tick, &mut seconds, format!("generate {label} harmless (guided), first stream"), &guides)?;
            Ok::<_, Error>((g_on, seconds))
        },
        |tick: &Tick| {
            let mut seconds = BTreeMap::new();
            let mut generate = |name: &str, model: &Model, hook: &mut dyn Hook, set: &Set, copts| {
                complete_timed(tick, &mut seconds, name, model, hook, set, copts)
            };
            let g_sh = generate(
                &format!("{label} harmful"),
                subject_model,
                subject_hook().as_mut(),
                &inputs.harmful,
                copts(first, true),
            )?;
            let g_oh = generate("original harmful", original, &mut NoHook, &inputs.harmful, copts(first, true))?;
            let g_induced = match induce_at {
                Some((d, layer)) => {
                    let mut add = Interventions::activation_addition(layers, layer, &d.values, opts.coeff)?;
                    let g = generate(
                        "induced harmless",
                        original,
                        &mut add,
                        &inputs.harmless,
                        copts(Record::default(), true),
                    )?;
                    Some((layer, g))
                }
                None => None,
            };
            // Equivalence: only an edited checkpoint with its direction can be compared with its hooks.
            let equivalence_report = match equivalence_input {
                Some((model, record, against)) => {
                    let t = Instant::now();
                    let prompts: Vec<Vec<u32>> = inputs
                        .harmful
                        .ids
                        .iter()
                        .take(k_equivalence)
                        .chain(inputs.harmless.ids.iter().take(k_equivalence))
                        .cloned()
                        .collect();
                    let (claim, mut caveats) = match record {
                        Some(r) => (r.claim.clone(), r.caveats.clone()),
                        None => (Claim::full(layers), Vec::new()),
                    };
                    // The edit's own hooks replace the claim's one-direction, one-scale hooks, and with them
                    // the caveat that those are not this edit.
                    let (mut hooks, split, what) = match against {
                        Against::Own(h) => {
                            caveats.retain(|c| !matches!(c, Caveat::Variant { .. }));
                            caveats.splice(0..0, h.caveat.clone());
                            (h.hooks.clone(), h.idempotent, Some(h.what.clone()))
                        }
                        Against::Claim(d) => (claim.hooks(layers, &d.values)?, claim.scale == 1.0, None),
                    };
                    let b = opts.batch_size.clamp(1, 16);
                    let mut ticker = tick.counter();
                    let result = equivalence(original, model, &mut hooks, split, &prompts, b, &mut |n| ticker(n))?;
                    seconds.insert("equivalence".to_string(), t.elapsed().as_secs_f64());
                    let caveat_notes = caveats.iter().map(|c| c.describe()).collect();
                    Some(EquivalenceReport { claim, hooks: what, caveats, caveat_notes, result })
                }
                None => None,
            };
            // Then the guided chunks stream a has not taken (none if it failed first: its error is reported).
            let from_a = from_a; // Owned here: a receiver is not shared between threads.
            if let Ok(guides) = from_a.recv() {
                take_chunks(tick, &mut seconds, format!("generate {label} harmless (guided), second stream"), &guides)?;
            }
            Ok::<_, Error>((g_sh, g_oh, g_induced, equivalence_report, seconds))
        },
    );
    let (mut g_on, seconds_a) = stream_a?;
    let (mut g_sh, mut g_oh, g_induced, equivalence_report, seconds_b) = stream_b?;
    let mut g_sn = Vec::with_capacity(n_harmless);
    let mut scored = Vec::with_capacity(n_harmless);
    for part in guided.into_inner().unwrap_or_else(|e| e.into_inner()) {
        let (g, s) =
            part.ok_or_else(|| Error::Input("a chunk of the guided harmless completions was not run".into()))?;
        g_sn.extend(g);
        scored.extend(s);
    }
    // Cross-entropy of both on the original's own harmless completions without the end-of-turn token: the
    // original's from the log-probabilities its greedy run chose them with (the same computation as teacher
    // forcing, `tests/loss.rs`), the compared run's from the teacher forcing that guided its completions.
    let (ce_original, ce_edited) = if opts.cross_entropy {
        let stops = inputs.chat.eos_ids();
        let kept =
            |g: &eval::Completion| g.tokens.len() - usize::from(g.tokens.last().is_some_and(|t| stops.contains(t)));
        let empty = || Error::Input("cross-entropy: every harmless completion is empty".into());
        let a = Loss::from_logprobs(g_on.iter().map(|g| &g.logprobs[..kept(g)])).ok_or_else(empty)?;
        let e = Loss::from_logprobs(scored.iter().zip(&g_on).map(|(s, g)| &s[..kept(g)])).ok_or_else(empty)?;
        (Some(a), Some(e))
    } else {
        (None, None)
    };
    let mut seconds: BTreeMap<String, f64> = seconds_a.into_iter().chain(seconds_b).collect();
    let o_harmful: Vec<Vec<f32>> = g_oh.iter_mut().map(|g| std::mem::take(&mut g.first_logits)).collect();
    let o_harmless: Vec<Vec<f32>> = g_on.iter_mut().map(|g| std::mem::take(&mut g.first_logits)).collect();
    let s_harmful: Vec<Vec<f32>> = g_sh.iter_mut().map(|g| std::mem::take(&mut g.first_logits)).collect();
    let s_harmless: Vec<Vec<f32>> = g_sn.iter_mut().map(|g| std::mem::take(&mut g.first_logits)).collect();
    // The refusal score is a diagnostic: a model whose refusal tokens cannot be detected (it does not refuse
    // in a way one token measures) is still verified, without scores, and the report says why.
    let (refusal_tokens, detected, undetected) = match &inputs.refusal_tokens {
        Some(ids) => (Some(ids.clone()), None, None),
        None => {
            let mut first = eval::FirstTokens::new(vocab);
            o_harmful.iter().for_each(|z| first.add(true, z));
            o_harmless.iter().for_each(|z| first.add(false, z));
            match first.detect(inputs.chat) {
                Ok(d) => (Some(d.ids.clone()), Some(d), None),
                Err(eval::EvalError::Refusal(why)) => (None, None, Some(why)),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if let Some(&t) = refusal_tokens.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(Error::Input(format!("refusal token {t} is outside the vocabulary of {vocab} ids")));
    }
    let scores = |rows: &[Vec<f32>]| -> Option<Vec<f64>> {
        let ids = refusal_tokens.as_ref()?;
        Some(rows.iter().map(|z| eval::score::refusal_score(z, ids) as f64).collect())
    };
    let kls: Vec<f64> = o_harmless.iter().zip(&s_harmless).map(|(a, b)| eval::score::kl(a, b)).collect();
    let kl = kls.iter().sum::<f64>() / kls.len() as f64;
    let kl_max = kls.iter().copied().fold(0f64, f64::max);
    let (sc_oh, sc_on, sc_sh, sc_sn) =
        (scores(&o_harmful), scores(&o_harmless), scores(&s_harmful), scores(&s_harmless));
    drop((o_harmful, o_harmless, s_harmful, s_harmless));
    let arm = |label: &str, set: &Set, harmful: bool, gens: &[eval::Completion], scores: Option<&[f64]>| -> Arm {
        let cs = set
            .prompts
            .prompts
            .iter()
            .zip(gens)
            .enumerate()
            .map(|(i, (p, g))| {
                Completion::new(
                    &p.instruction,
                    p.category.as_deref(),
                    harmful,
                    &g.text,
                    inputs.judge.is_refusal(&g.text),
                    scores.map(|s| s[i]),
                    g.tokens.len(),
                    g.finish == Finish::Stop,
                )
            })
            .collect();
        Arm::new(label, cs)
    };
    let harmful_report = SetReport {
        source: source(&inputs.harmful.prompts),
        harmful: true,
        original: arm("original", &inputs.harmful, true, &g_oh, sc_oh.as_deref()),
        edited: arm(label, &inputs.harmful, true, &g_sh, sc_sh.as_deref()),
    };
    let harmless_report = SetReport {
        source: source(&inputs.harmless.prompts),
        harmful: false,
        original: arm("original", &inputs.harmless, false, &g_on, sc_on.as_deref()),
        edited: arm(label, &inputs.harmless, false, &g_sn, sc_sn.as_deref()),
    };
    let induced = g_induced.map(|(layer, g)| Induced {
        layer,
        coeff: opts.coeff,
        arm: arm(&format!("direction added at layer {layer}"), &inputs.harmless, false, &g, None),
    });

    // KL where the original answered: what the edit changed where it was not meant to change anything.
    let answered: Vec<f64> =
        kls.iter().zip(&harmless_report.original.completions).filter(|(_, c)| !c.refused).map(|(k, _)| *k).collect();
    let kl_answered = (!answered.is_empty()).then(|| answered.iter().sum::<f64>() / answered.len() as f64);
    let damage = Some(Damage { kl, kl_max, kl_answered, answered: answered.len(), ce_original, ce_edited });
    let measured = Measured {
        harmful_refusal: Some(harmful_report.edited.refusal.rate),
        harmless_refusal: Some(harmless_report.edited.refusal.rate),
        kl: Some(kl),
        equivalence_error: equivalence_report.as_ref().map(|e| e.result.max),
    };
    let mut settings = json!({
        "max_new_tokens": opts.max_new_tokens,
        "batch_size": opts.batch_size,
        "greedy": true,
        "stop": "the model's end-of-turn ids",
        "judge": {"source": inputs.judge.source, "phrases": inputs.judge.phrases(), "match": "substring, case-insensitive, typographic quotes made ASCII"},
        "second_judge": eval::judge::SECOND_JUDGE,
        "refusals_cut": "harmful completions and those under activation addition end where the judge finds a refusal phrase (the same verdict; the rest is not generated); harmless ones run to end of turn or max_new_tokens",
        "refusal_tokens": refusal_tokens,
        "refusal_tokens_detected": detected,
        "refusal_tokens_not_detected": undetected,
        "equivalence_prompts_per_set": opts.equivalence_prompts,
        "activation_addition_coeff": opts.coeff,
    });
    if let (Some(s), Some(extra)) = (settings.as_object_mut(), inputs.settings.as_object()) {
        s.extend(extra.clone());
    }
    seconds.insert("total".to_string(), started.elapsed().as_secs_f64());
    Ok(Report {
        tool: "abliterate".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        original: inputs.original_path.clone(),
        edited: match &inputs.subject {
            Subject::Edited { path, .. } => Some(path.clone()),
            Subject::Hooks => None,
        },
        direction: inputs.direction.as_ref().map(|d| d.info.clone()),
        settings,
        harmful: harmful_report,
        harmless: harmless_report,
        damage,
        induced,
        equivalence: equivalence_report,
        gates: gates.check(&measured),
        seconds,
    })
}

fn source(p: &PromptSet) -> Source {
    Source { name: p.source.clone(), sha256: p.sha256.clone(), n: p.len() }
}
