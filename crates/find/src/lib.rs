//! Finding the refusal direction of a chat model exactly as Arditi et al. do (method.md §2-§5), on our
//! own runtime: sample the prompt sets, filter them by refusal score, take the difference of mean
//! activations at every post-instruction position and layer (the candidates), score every candidate
//! that can be chosen by bypass, induce and KL, and choose one with the paper's filter, or the project's
//! fallbacks when nothing passes.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("models/smollm2-refusal");
//! let (model, chat) = (model::Model::open(dir)?, chat::Chat::load(dir)?);
//! let found = find::find(&model, &chat, &find::Sets::embedded(), &find::Options::default(), &find::NoProgress)?;
//! println!("chose {:?} by {:?}", (found.choice.position, found.choice.layer), found.choice.rule);
//! find::output::write(&found, &find::output::Meta::for_model(dir)?, std::path::Path::new("out"), false)?;
//! # Ok(()) }
//! ```
//!
//! Everything the paper's code does is reproduced to the last digit it fixes (f64 softmax and means,
//! f32-rounded refusal scores, the filter order and thresholds); the only shortcuts are those that give
//! the same scores and the same choice (method.md §5, and each prompt's shared chat prefix computed once:
//! `eval::Prompts`). A model that barely refuses stops with [`FindError::NotRefusing`] instead of
//! producing a meaningless direction.
//!
//! No clap, no terminal: progress goes through [`Progress`]; outputs are written by [`output`] into a
//! temporary directory renamed into place.

pub mod output;
mod plot;
mod report;
pub mod select;

use std::time::Instant;

use chat::Chat;
use eval::score::{KlBase, mean_f32, refusal_score};
use eval::{
    BatchOptions, Detected, FirstTokens, Formatter, Prompt, PromptSet, Prompts, PyRandom, Residuals, Split, System,
};
use model::{Acts, At, Hook, Interventions, Model, NoHook, Site};
use serde::Serialize;

pub use select::{Choice, Rule, Scored, SelectOptions};

/// Everything that can go wrong. Messages say what was measured and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Chat(#[from] chat::Error),
    #[error("{0}")]
    Sampling(String),
    #[error("{0}")]
    RefusalToken(String),
    #[error("{0}")]
    EmptyAfterFilter(String),
    #[error("{0}")]
    NotRefusing(String),
    #[error("{0}")]
    NoCandidate(String),
    #[error("`{}`: {cause}", path.display())]
    Io { path: std::path::PathBuf, cause: std::io::Error },
    #[error("{0}")]
    Output(String),
}

pub type Result<T, E = FindError> = std::result::Result<T, E>;

/// The four prompt sets (before sampling).
#[derive(Clone, Debug)]
pub struct Sets {
    pub harmful_train: PromptSet,
    pub harmless_train: PromptSet,
    pub harmful_val: PromptSet,
    pub harmless_val: PromptSet,
}

impl Sets {
    /// The default sets compiled into the binary.
    pub fn embedded() -> Sets {
        Sets {
            harmful_train: eval::prompts::embedded(Split::HarmfulTrain),
            harmless_train: eval::prompts::embedded(Split::HarmlessTrain),
            harmful_val: eval::prompts::embedded(Split::HarmfulVal),
            harmless_val: eval::prompts::embedded(Split::HarmlessVal),
        }
    }

    fn all(&self) -> [(&'static str, &PromptSet); 4] {
        [
            ("harmful_train", &self.harmful_train),
            ("harmless_train", &self.harmless_train),
            ("harmful_val", &self.harmful_val),
            ("harmless_val", &self.harmless_val),
        ]
    }
}

/// How prompts are drawn from the sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sampling {
    /// CPython's `random.seed(seed)` then `random.sample` of each set in the paper's order (harmful
    /// train, harmless train, harmful val, harmless val); a set no larger than its sample size is used
    /// whole, in order, without a draw.
    Seed { seed: u64 },
    /// The paper's exact draws (method.md §2): seed 42, and every set must be larger than its sample size.
    Paper,
}

/// Options of a run (the defaults are the paper's).
#[derive(Clone, Debug)]
pub struct Options {
    /// Training prompts sampled per set (paper: 128).
    pub n_train: usize,
    /// Validation prompts sampled per set (paper: 32).
    pub n_val: usize,
    pub sampling: Sampling,
    pub system: System,
    /// Refusal token ids; detected from the model when `None`.
    pub refusal_tokens: Option<Vec<u32>>,
    pub select: SelectOptions,
    /// Prompts per forward pass.
    pub batch_size: usize,
    /// Compute the chat prefix all prompts share once per forward pass (same result, less work).
    pub share_prefix: bool,
    /// Stop when fewer than this fraction of the sampled harmful training prompts is refused (refusal
    /// score > 0): the model barely refuses and a direction would be meaningless.
    pub min_refused: f64,
    /// Filter the prompts by refusal score (method.md §2; the repo's `filter_train`/`filter_val`). Off,
    /// every sampled prompt is kept and the barely-refusing stop does not apply.
    pub filter: bool,
    /// Compute every score of every candidate the way the paper's code does, without any shortcut (no
    /// prefix reuse for induce, no baseline scores for zero candidates): the reference the shortcuts are
    /// tested against. Implies all scores.
    pub exhaustive: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            n_train: 128,
            n_val: 32,
            sampling: Sampling::Seed { seed: 42 },
            system: System::TemplateDefault,
            refusal_tokens: None,
            select: SelectOptions::default(),
            batch_size: 32,
            share_prefix: true,
            min_refused: 0.1,
            filter: true,
            exhaustive: false,
        }
    }
}

/// The long steps, for progress and timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Baseline refusal scores of the sampled prompts (and refusal-token detection).
    Filter,
    /// Mean activations of the filtered training prompts.
    Means,
    /// Baseline logits and cached residuals of the validation prompts.
    Baseline,
    Kl,
    Induce,
    Bypass,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Filter => "filter",
            Stage::Means => "means",
            Stage::Baseline => "baseline",
            Stage::Kl => "kl",
            Stage::Induce => "induce",
            Stage::Bypass => "bypass",
        }
    }
}

/// Progress of a run: `start` a stage of `total` units (prompts or candidates), `advance` by units.
pub trait Progress {
    fn start(&self, stage: Stage, total: u64);
    fn advance(&self, n: u64);
    fn finish(&self, stage: Stage, seconds: f64);
}

/// No progress reporting.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: Stage, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self, _: Stage, _: f64) {}
}

/// The four lists of a run, in the paper's order.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Lists<T> {
    pub harmful_train: T,
    pub harmless_train: T,
    pub harmful_val: T,
    pub harmless_val: T,
}

impl<T> Lists<T> {
    fn from_array([a, b, c, d]: [T; 4]) -> Lists<T> {
        Lists { harmful_train: a, harmless_train: b, harmful_val: c, harmless_val: d }
    }

    pub fn as_array(&self) -> [(&'static str, &T); 4] {
        [
            ("harmful_train", &self.harmful_train),
            ("harmless_train", &self.harmless_train),
            ("harmful_val", &self.harmful_val),
            ("harmless_val", &self.harmless_val),
        ]
    }
}

/// A prompt set as used: where it came from and how many prompts it had.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SetInfo {
    pub source: String,
    pub sha256: String,
    pub size: usize,
}

/// The refusal tokens used, and how they were chosen.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Refusal {
    pub ids: Vec<u32>,
    /// Each token decoded.
    pub texts: Vec<String>,
    /// The detection's evidence; `None` when given with `--refusal-token`.
    pub detected: Option<Detected>,
}

/// Wall seconds of one stage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timing {
    pub stage: Stage,
    pub seconds: f64,
    /// Forward passes (candidates or prompt batches) in the stage.
    pub calls: usize,
}

/// Everything a run found.
#[derive(Clone, Debug, Serialize)]
pub struct Found {
    /// The prompt template (`{instruction}` for the instruction).
    pub template: String,
    pub system: System,
    /// The system prompt the prompts contain, if any.
    pub effective_system: Option<String>,
    /// Post-instruction token ids and their text.
    pub post_instruction: Vec<u32>,
    pub post_instruction_text: Vec<String>,
    /// Candidate positions (`-n_eoi ..= -1`).
    pub positions: Vec<i64>,
    pub layers: usize,
    pub hidden: usize,
    pub sets: Lists<SetInfo>,
    pub sampling: Sampling,
    pub n_train: usize,
    pub n_val: usize,
    /// The sampled instructions, in order.
    pub sampled: Lists<Vec<String>>,
    /// Baseline refusal score of every sampled prompt (method.md §2 filter).
    pub filter_scores: Lists<Vec<f32>>,
    /// Indices into `sampled` of the prompts kept.
    pub kept: Lists<Vec<usize>>,
    pub refusal: Refusal,
    /// Mean refusal scores of the filtered validation sets without intervention.
    pub baseline_harmful_val: f64,
    pub baseline_harmless_val: f64,
    /// `[positions, layers, hidden]` f64: `r = mean(harmful) − mean(harmless)` (method.md §4).
    #[serde(skip)]
    pub candidates: Vec<f64>,
    /// `[positions, layers, hidden]` f64: the mean of the filtered harmless training prompts' residuals, what
    /// the projected and biprojected variants remove from a direction (docs/variants.md).
    #[serde(skip)]
    pub harmless_means: Vec<f64>,
    /// Every candidate in the paper's order (position outer, layer inner).
    pub scores: Vec<Scored>,
    pub choice: Choice,
    pub select: SelectOptionsReport,
    /// The chat prefix computed once per pass (tokens), 0 when not shared.
    pub shared_prefix_tokens: usize,
    pub timings: Vec<Timing>,
}

/// The selection settings, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SelectOptionsReport {
    pub kl_max: f64,
    pub max_layer_fraction: f64,
    pub first_pruned_layer: usize,
    pub min_induce: f64,
    pub positions: Option<Vec<i64>>,
    pub all_scores: bool,
    pub relax_induce: bool,
    pub batch_size: usize,
}

impl Found {
    /// The raw vector of candidate `(position index, layer)`.
    pub fn candidate(&self, position_index: usize, layer: usize) -> &[f64] {
        let at = (position_index * self.layers + layer) * self.hidden;
        &self.candidates[at..at + self.hidden]
    }

    /// The chosen direction (un-normalized).
    pub fn direction(&self) -> &[f64] {
        self.candidate(self.choice.index / self.layers, self.choice.layer)
    }

    pub fn chosen(&self) -> &Scored {
        &self.scores[self.choice.index]
    }

    /// The instructions of one list kept by the filter, in order.
    pub fn filtered(&self, list: &str) -> Vec<String> {
        let sampled = self.sampled.as_array().into_iter().find(|(n, _)| *n == list).map(|(_, v)| v);
        let kept = self.kept.as_array().into_iter().find(|(n, _)| *n == list).map(|(_, v)| v);
        match (sampled, kept) {
            (Some(s), Some(k)) => k.iter().map(|&i| s[i].clone()).collect(),
            _ => Vec::new(),
        }
    }
}

/// Draws the four lists (method.md §2).
pub fn sample(sets: &Sets, n_train: usize, n_val: usize, sampling: Sampling) -> Result<Lists<Vec<Prompt>>> {
    let seed = match sampling {
        Sampling::Paper => 42,
        Sampling::Seed { seed } => seed,
    };
    let mut rng = PyRandom::seed(seed as i128);
    let sizes = [n_train, n_train, n_val, n_val];
    let mut out = Vec::with_capacity(4);
    for ((name, set), n) in sets.all().into_iter().zip(sizes) {
        let drawn = if set.len() <= n && sampling != Sampling::Paper {
            set.prompts.clone()
        } else {
            rng.sample(&set.prompts, n).map_err(|e| {
                FindError::Sampling(format!(
                    "{name} (`{}`): {e}; --paper-sampling draws exactly {n} prompts, so the set needs at least that many",
                    set.source
                ))
            })?
        };
        out.push(drawn);
    }
    Ok(Lists::from_array(out.try_into().expect("four lists")))
}

/// Accumulates, in f64, the residual entering every layer at the last `n` positions of each prompt
/// (method.md §4: running sums, prompts in order; no buffer of every row).
struct MeanSums {
    n: usize,
    layers: usize,
    hidden: usize,
    sums: Vec<f64>,
    prompts: usize,
}

impl MeanSums {
    fn new(n: usize, layers: usize, hidden: usize) -> MeanSums {
        MeanSums { n, layers, hidden, sums: vec![0.0; n * layers * hidden], prompts: 0 }
    }
}

impl Hook for MeanSums {
    fn wants(&self, at: At) -> bool {
        at.site == Site::Input && at.layer < self.layers
    }

    fn visit(&mut self, at: At, acts: Acts<'_>) -> model::Result<()> {
        let (n, d) = (self.n, self.hidden);
        for seg in acts.segments {
            if seg.len < n {
                return Err(model::ModelError::Hook(format!(
                    "prompt {} has {} tokens after the shared prefix, fewer than the {n} post-instruction positions",
                    seg.row, seg.len
                )));
            }
            let end = seg.start + seg.len;
            for (p, row) in (end - n..end).enumerate() {
                let x = &acts.data[row * d..(row + 1) * d];
                let s = &mut self.sums[(p * self.layers + at.layer) * d..][..d];
                s.iter_mut().zip(x).for_each(|(s, &x)| *s += x as f64);
            }
            if at.layer == 0 {
                self.prompts += 1;
            }
        }
        Ok(())
    }
}

/// Runs the whole method. `model` and `chat` are the same model directory's.
pub fn find(model: &Model, chat: &Chat, sets: &Sets, opts: &Options, progress: &dyn Progress) -> Result<Found> {
    let arch = model.arch();
    let (layers, hidden, vocab) = (arch.layers, arch.hidden, arch.vocab);
    let formatter = Formatter::new(chat, opts.system.clone())?;
    let eoi = formatter.post_instruction().ids().to_vec();
    let n_eoi = eoi.len();
    let positions: Vec<i64> = (-(n_eoi as i64)..0).collect();
    if let Some(bad) = opts.select.positions.iter().flatten().find(|p| !positions.contains(p)) {
        return Err(FindError::Sampling(format!(
            "--positions {bad}: the template has {n_eoi} post-instruction tokens, so positions run from -{n_eoi} to -1"
        )));
    }
    if let Some(t) = opts.refusal_tokens.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(FindError::RefusalToken(format!("refusal token id {t} is outside the vocabulary of {vocab} ids")));
    }
    let batch = |ids: Vec<Vec<u32>>| {
        Prompts::new(
            ids,
            BatchOptions { batch_size: opts.batch_size, share_prefix: opts.share_prefix, keep: n_eoi + 1 },
        )
    };
    let mut timings = Vec::new();

    // Sampling (method.md §2) and formatting.
    let sampled = sample(sets, opts.n_train, opts.n_val, opts.sampling)?;
    let texts = |list: &[Prompt]| list.iter().map(|p| p.instruction.clone()).collect::<Vec<String>>();
    let instructions = Lists {
        harmful_train: texts(&sampled.harmful_train),
        harmless_train: texts(&sampled.harmless_train),
        harmful_val: texts(&sampled.harmful_val),
        harmless_val: texts(&sampled.harmless_val),
    };
    let ids: Vec<Vec<Vec<u32>>> =
        instructions.as_array().into_iter().map(|(_, list)| formatter.all(list)).collect::<eval::Result<Vec<_>>>()?;
    let lists: Vec<Prompts> = ids.into_iter().map(batch).collect::<eval::Result<Vec<_>>>()?;
    let shared_prefix_tokens = lists[0].prefix().len();

    // Filter (method.md §2), detecting the refusal tokens first where none are given.
    let started = Instant::now();
    progress.start(Stage::Filter, lists.iter().map(|l| l.len() as u64).sum());
    let mut train_logits: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
    let mut scores: [Vec<f32>; 4] = Default::default();
    let (refusal_ids, detected) = match &opts.refusal_tokens {
        Some(ids) => (ids.clone(), None),
        None => {
            let mut first = FirstTokens::new(vocab);
            for (k, list) in lists[..2].iter().enumerate() {
                list.last_logits(model, &mut NoHook, &mut |_, logits| {
                    first.add(k == 0, logits);
                    train_logits[k].extend_from_slice(logits);
                    progress.advance(1);
                    Ok(())
                })?;
            }
            let detected = first.detect(chat).map_err(|e| FindError::RefusalToken(e.to_string()))?;
            (detected.ids.clone(), Some(detected))
        }
    };
    for (k, list) in lists.iter().enumerate() {
        if k < 2 && detected.is_some() {
            scores[k] = train_logits[k].chunks(vocab).map(|l| refusal_score(l, &refusal_ids)).collect();
            continue;
        }
        list.last_logits(model, &mut NoHook, &mut |_, logits| {
            scores[k].push(refusal_score(logits, &refusal_ids));
            progress.advance(1);
            Ok(())
        })?;
    }
    drop(train_logits);
    let texts_of = |ids: &[u32]| -> Result<Vec<String>> {
        ids.iter().map(|&t| Ok(chat.decode(&[t], chat::Special::Keep)?)).collect()
    };
    let refusal = Refusal { texts: texts_of(&refusal_ids)?, ids: refusal_ids.clone(), detected };
    // Keep harmful prompts with score > 0 and harmless ones with score < 0 (both strict).
    let kept: Vec<Vec<usize>> = scores
        .iter()
        .enumerate()
        .map(|(k, s)| {
            (0..s.len()).filter(|&i| !opts.filter || if k % 2 == 0 { s[i] > 0.0 } else { s[i] < 0.0 }).collect()
        })
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    progress.finish(Stage::Filter, seconds);
    timings.push(Timing { stage: Stage::Filter, seconds, calls: lists.iter().map(|l| l.len()).sum() });

    let names = ["harmful_train", "harmless_train", "harmful_val", "harmless_val"];
    let counts: Vec<String> =
        names.iter().zip(&kept).zip(&scores).map(|((n, k), s)| format!("{n} {}/{}", k.len(), s.len())).collect();
    let refused = kept[0].len() as f64 / scores[0].len().max(1) as f64;
    if opts.filter && refused < opts.min_refused {
        let mean = mean_f32(&scores[0]);
        return Err(FindError::NotRefusing(format!(
            "the model barely refuses: only {} of its {} sampled harmful training prompts get a positive refusal score \
             (refusal token {}; mean score {mean:.2}, need at least {:.0}% refused). A direction found from this would be \
             meaningless; is this a base model, or one already edited? (kept after filtering: {})",
            kept[0].len(),
            scores[0].len(),
            tokens_list(&refusal),
            opts.min_refused * 100.0,
            counts.join(", ")
        )));
    }
    if let Some(k) = kept.iter().position(Vec::is_empty) {
        return Err(FindError::EmptyAfterFilter(format!(
            "{} is empty after filtering (kept: {}); every set needs at least one prompt",
            names[k],
            counts.join(", ")
        )));
    }
    let filtered =
        |k: usize| -> eval::Result<Prompts> { batch(kept[k].iter().map(|&i| lists[k].ids()[i].clone()).collect()) };

    // Candidate means (method.md §4).
    let started = Instant::now();
    progress.start(Stage::Means, (kept[0].len() + kept[1].len()) as u64);
    let mean_of = |k: usize| -> Result<Vec<f64>> {
        let prompts = filtered(k)?;
        let mut sums = MeanSums::new(n_eoi, layers, hidden);
        prompts.run(model, &mut NoHook, &mut sums, model::Logits::None, &mut |range, _| {
            progress.advance(range.len() as u64);
            Ok(())
        })?;
        debug_assert_eq!(sums.prompts, prompts.len());
        let n = prompts.len() as f64;
        Ok(sums.sums.into_iter().map(|s| s / n).collect())
    };
    let harmful_means = mean_of(0)?;
    let harmless_means = mean_of(1)?;
    let candidates: Vec<f64> = harmful_means.iter().zip(&harmless_means).map(|(h, n)| h - n).collect();
    drop(harmful_means);
    let seconds = started.elapsed().as_secs_f64();
    progress.finish(Stage::Means, seconds);
    timings.push(Timing { stage: Stage::Means, seconds, calls: kept[0].len() + kept[1].len() });

    // Baselines of the filtered validation sets, cached residuals for induce (method.md §5 items 3-4).
    let started = Instant::now();
    let first_pruned = opts.select.first_pruned(layers);
    let (harmful_val, harmless_val) = (filtered(2)?, filtered(3)?);
    progress.start(Stage::Baseline, (harmful_val.len() + 2 * harmless_val.len()) as u64);
    let mut kl_base = Vec::with_capacity(harmless_val.len());
    let mut base_harmless = Vec::with_capacity(harmless_val.len());
    harmless_val.last_logits(model, &mut NoHook, &mut |_, logits| {
        kl_base.push(KlBase::new(logits));
        base_harmless.push(refusal_score(logits, &refusal_ids));
        progress.advance(1);
        Ok(())
    })?;
    let mut base_harmful = Vec::with_capacity(harmful_val.len());
    harmful_val.last_logits(model, &mut NoHook, &mut |_, logits| {
        base_harmful.push(refusal_score(logits, &refusal_ids));
        progress.advance(1);
        Ok(())
    })?;
    let select_opts = SelectOptions { all_scores: opts.select.all_scores || opts.exhaustive, ..opts.select.clone() };
    let cached: Vec<usize> = match (opts.exhaustive, select_opts.all_scores) {
        (true, _) => Vec::new(),
        (false, true) => (0..layers).collect(),
        (false, false) => (0..first_pruned).collect(),
    };
    let residuals = harmless_val.residuals(model, &cached)?;
    progress.advance(harmless_val.len() as u64);
    let seconds = started.elapsed().as_secs_f64();
    progress.finish(Stage::Baseline, seconds);
    timings.push(Timing { stage: Stage::Baseline, seconds, calls: 3 });

    // Scores and the choice (method.md §5).
    let norms: Vec<f64> = candidates.chunks(hidden).map(direction::norm).collect();
    let max_norm = norms.iter().copied().fold(0.0, f64::max);
    let mut scored: Vec<Scored> = norms
        .iter()
        .enumerate()
        .map(|(i, &norm)| Scored {
            position: positions[i / layers],
            layer: i % layers,
            norm,
            degenerate: norm <= 1e-6 * max_norm,
            kl: None,
            induce: None,
            bypass: None,
            rejected: None,
        })
        .collect();
    let baseline_harmful_val = mean_f32(&base_harmful);
    let baseline_harmless_val = mean_f32(&base_harmless);
    let mut scorer = Scorer {
        model,
        candidates: &candidates,
        norms: &norms,
        hidden,
        layers,
        refusal: &refusal_ids,
        harmful_val: &harmful_val,
        harmless_val: &harmless_val,
        kl_base: &kl_base,
        residuals: &residuals,
        baseline_harmful_val,
        baseline_harmless_val,
        progress,
        exhaustive: opts.exhaustive,
        current: None,
        timings: Vec::new(),
    };
    let choice = select::select(&mut scored, layers, &select_opts, &mut scorer);
    scorer.close();
    timings.append(&mut scorer.timings);
    let choice = choice.map_err(|e| match e {
        FindError::NoCandidate(m) => FindError::NoCandidate(format!(
            "{m} (refusal token {}; kept after filtering: {})",
            tokens_list(&refusal),
            counts.join(", ")
        )),
        e => e,
    })?;

    let post_instruction_text = texts_of(&eoi)?;
    Ok(Found {
        template: formatter.template()?,
        system: opts.system.clone(),
        effective_system: formatter.effective_system().map(str::to_string),
        post_instruction: eoi,
        post_instruction_text,
        positions,
        layers,
        hidden,
        sets: Lists {
            harmful_train: info(&sets.harmful_train),
            harmless_train: info(&sets.harmless_train),
            harmful_val: info(&sets.harmful_val),
            harmless_val: info(&sets.harmless_val),
        },
        sampling: opts.sampling,
        n_train: opts.n_train,
        n_val: opts.n_val,
        sampled: instructions,
        filter_scores: Lists::from_array(scores),
        kept: Lists::from_array(kept.try_into().expect("four lists")),
        refusal,
        baseline_harmful_val,
        baseline_harmless_val,
        candidates,
        harmless_means,
        scores: scored,
        choice,
        select: SelectOptionsReport {
            kl_max: opts.select.kl_max,
            max_layer_fraction: opts.select.max_layer_fraction,
            first_pruned_layer: first_pruned,
            min_induce: opts.select.min_induce,
            positions: opts.select.positions.clone(),
            all_scores: select_opts.all_scores,
            relax_induce: opts.select.relax_induce,
            batch_size: opts.batch_size,
        },
        shared_prefix_tokens,
        timings,
    })
}

/// `"I" = 57, ...`, and whether detected.
fn tokens_list(refusal: &Refusal) -> String {
    let list: Vec<String> = refusal.texts.iter().zip(&refusal.ids).map(|(t, i)| format!("{t:?} = {i}")).collect();
    format!("{}{}", list.join(", "), if refusal.detected.is_some() { ", detected" } else { "" })
}

fn info(set: &PromptSet) -> SetInfo {
    SetInfo { source: set.source.clone(), sha256: set.sha256.clone(), size: set.len() }
}

/// The forward passes behind the three scores.
struct Scorer<'a> {
    model: &'a Model,
    candidates: &'a [f64],
    norms: &'a [f64],
    hidden: usize,
    layers: usize,
    refusal: &'a [u32],
    harmful_val: &'a Prompts,
    harmless_val: &'a Prompts,
    kl_base: &'a [KlBase],
    residuals: &'a Residuals,
    baseline_harmful_val: f64,
    baseline_harmless_val: f64,
    progress: &'a dyn Progress,
    exhaustive: bool,
    /// The stage running, when it started, and its calls so far.
    current: Option<(Stage, Instant, usize)>,
    timings: Vec<Timing>,
}

impl Scorer<'_> {
    fn vector(&self, i: usize) -> &[f64] {
        &self.candidates[i * self.hidden..(i + 1) * self.hidden]
    }

    /// An exactly-zero candidate: its hooks are no-ops (r̂ = 0 / (0 + 1e-8) = 0; adding 0 changes
    /// nothing), so its scores are the baseline's without a forward pass (method.md §4).
    fn zero(&self, i: usize) -> bool {
        self.norms[i] == 0.0 && !self.exhaustive
    }

    fn tick(&mut self) {
        if let Some((_, _, calls)) = &mut self.current {
            *calls += 1;
        }
        self.progress.advance(1);
    }

    fn close(&mut self) {
        if let Some((stage, started, calls)) = self.current.take() {
            let seconds = started.elapsed().as_secs_f64();
            self.progress.finish(stage, seconds);
            match self.timings.iter_mut().find(|t| t.stage == stage) {
                Some(t) => {
                    t.seconds += seconds;
                    t.calls += calls;
                }
                None => self.timings.push(Timing { stage, seconds, calls }),
            }
        }
    }

    fn mean_refusal(&self, prompts: &Prompts, hook: &mut dyn Hook) -> Result<f64> {
        let mut s = Vec::with_capacity(prompts.len());
        prompts.last_logits(self.model, hook, &mut |_, logits| {
            s.push(refusal_score(logits, self.refusal));
            Ok(())
        })?;
        Ok(mean_f32(&s))
    }
}

impl select::Evaluate for Scorer<'_> {
    fn plan(&mut self, kind: select::ScoreKind, count: usize) {
        self.close();
        let stage = match kind {
            select::ScoreKind::Kl => Stage::Kl,
            select::ScoreKind::Induce => Stage::Induce,
            select::ScoreKind::Bypass => Stage::Bypass,
        };
        self.progress.start(stage, count as u64);
        self.current = Some((stage, Instant::now(), 0));
    }

    fn kl(&mut self, i: usize) -> Result<f64> {
        let kl = if self.zero(i) {
            0.0
        } else {
            let mut hook = Interventions::ablation(self.layers, self.vector(i))?;
            let mut sum = 0.0;
            self.harmless_val.last_logits(self.model, &mut hook, &mut |k, logits| {
                sum += self.kl_base[k].kl(logits);
                Ok(())
            })?;
            sum / self.harmless_val.len() as f64
        };
        self.tick();
        Ok(kl)
    }

    fn induce(&mut self, i: usize) -> Result<f64> {
        let layer = i % self.layers;
        let v = if self.zero(i) {
            self.baseline_harmless_val
        } else {
            let mut hook = Interventions::activation_addition(self.layers, layer, self.vector(i), 1.0)?;
            if self.exhaustive {
                self.mean_refusal(self.harmless_val, &mut hook)?
            } else {
                let mut s = Vec::with_capacity(self.harmless_val.len());
                self.harmless_val.last_logits_from(
                    self.model,
                    self.residuals,
                    layer,
                    &mut hook,
                    &mut |_, logits| {
                        s.push(refusal_score(logits, self.refusal));
                        Ok(())
                    },
                )?;
                mean_f32(&s)
            }
        };
        self.tick();
        Ok(v)
    }

    fn bypass(&mut self, i: usize) -> Result<f64> {
        let v = if self.zero(i) {
            self.baseline_harmful_val
        } else {
            let mut hook = Interventions::ablation(self.layers, self.vector(i))?;
            self.mean_refusal(self.harmful_val, &mut hook)?
        };
        self.tick();
        Ok(v)
    }
}
