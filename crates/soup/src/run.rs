//! A whole soup run: score every candidate on the validation split (cached), run the strategy
//! with merges averaged straight into a model and scored the same way (cached), write the soup
//! and the report. What `cargo xtask soup` (the `cnclip-soup` binary) does.

use crate::average::{average, plan};
use crate::cache::Cache;
use crate::candidate::{Candidate, resolve};
use crate::error::SoupError;
use crate::recipe::Recipe;
use crate::report::{Report, ReportInput};
use crate::score::{Progress, ScoreOptions, ValOptions, ValSet, score_model};
use crate::sink::{FileSink, ModelSink};
use crate::strategy::{self, Outcome, PairwiseOptions, Strategy};
use cnclip_model::ClipConfig;
use cnclip_model::weights::NativeReader;
use eval::Score;
use std::path::{Path, PathBuf};

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct SoupConfig {
    /// Native files, official `.pt`, Hugging Face directories or LoRA adapter files.
    pub candidates: Vec<PathBuf>,
    /// The base of the LoRA adapters among the candidates.
    pub lora_base: Option<PathBuf>,
    /// The architecture of official `.pt` candidates.
    pub pt_config: Option<ClipConfig>,
    /// The validation LMDB split (`imgs/`, and `pairs/` unless `val.texts` is given).
    pub val_data: PathBuf,
    pub val: ValOptions,
    pub score: ScoreOptions,
    pub strategy: Strategy,
    pub pairwise: PairwiseOptions,
    /// The run's directory: `soup.safetensors` (the soup, native), `report.md`, `report.json`.
    pub out: PathBuf,
    /// Scores and features per checkpoint and merge (share one between runs over the same
    /// candidates to reuse their scores).
    pub cache_dir: PathBuf,
    /// Regenerate the report from the cache: no model is run, nothing is written but the report;
    /// fails naming the first checkpoint or merge that is not cached.
    pub report_only: bool,
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// A step, in words.
    Stage(String),
    /// Progress within the current step.
    Progress(Progress),
}

/// What a run did.
#[derive(Debug)]
pub struct Summary {
    pub report: Report,
    pub markdown: PathBuf,
    pub json: PathBuf,
    /// Checkpoints and merges scored by running the model in this run.
    pub computed: usize,
    /// Scores taken from the cache.
    pub cached: usize,
    pub outcome: Outcome,
}

struct Runner<'a> {
    config: &'a SoupConfig,
    candidates: Vec<Candidate>,
    cache: Cache,
    val: ValSet,
    /// Native files of the candidates, made on first use.
    natives: Vec<Option<PathBuf>>,
    computed: usize,
    cached: usize,
}

impl Runner<'_> {
    fn eval_fingerprint(&self) -> String {
        format!(
            "{}|precision={:?}",
            self.val.fingerprint(),
            self.config.score.precision
        )
    }

    fn key(&self, recipe: &Recipe) -> String {
        let members: Vec<String> = recipe
            .weights()
            .iter()
            .map(|&(i, w)| format!("{}*{:016x}", self.candidates[i].identity, w.to_bits()))
            .collect();
        format!(
            "soup-score-v1|{}|{}",
            members.join("+"),
            self.eval_fingerprint()
        )
    }

    fn native(&mut self, i: usize) -> Result<PathBuf, SoupError> {
        if let Some(p) = &self.natives[i] {
            return Ok(p.clone());
        }
        let work = self.config.cache_dir.join("materialized");
        let p = self.candidates[i].native_path(&work, self.config.pt_config.as_ref())?;
        self.natives[i] = Some(p.clone());
        Ok(p)
    }

    /// The recipe's members as native files (made on first use) and opened for streaming.
    fn open_members(
        &mut self,
        recipe: &Recipe,
    ) -> Result<(Vec<PathBuf>, Vec<NativeReader>), SoupError> {
        let paths = recipe
            .members()
            .map(|i| self.native(i))
            .collect::<Result<Vec<_>, _>>()?;
        let opened = paths
            .iter()
            .map(NativeReader::open)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((paths, opened))
    }

    fn describe(&self, recipe: &Recipe) -> String {
        let names: Vec<String> = self.candidates.iter().map(|c| c.name.clone()).collect();
        recipe.describe(&names)
    }

    /// The score of `recipe`: from the cache, else by averaging into a model and scoring it.
    fn score(
        &mut self,
        recipe: &Recipe,
        events: &mut dyn FnMut(Event),
    ) -> Result<Score, SoupError> {
        let key = self.key(recipe);
        if let Some(score) = self.cache.score(&key)? {
            self.cached += 1;
            events(Event::Stage(format!(
                "{}: MR {:.2} (cached)",
                self.describe(recipe),
                score.mean_recall
            )));
            return Ok(score);
        }
        if let Some(score) =
            self.cache
                .rescore(&key, self.val.ground_truth(), self.config.score.device)?
        {
            self.cached += 1;
            events(Event::Stage(format!(
                "{}: MR {:.2} (from cached features)",
                self.describe(recipe),
                score.mean_recall
            )));
            return Ok(score);
        }
        if self.config.report_only {
            return Err(SoupError::Cache {
                path: self.cache.entry_dir(&key),
                reason: format!(
                    "no cached score for {} (run without --report-only to compute it)",
                    self.describe(recipe)
                ),
            });
        }
        events(Event::Stage(format!("scoring {}", self.describe(recipe))));
        let (paths, opened) = self.open_members(recipe)?;
        let members = weighted(&opened, recipe);
        let plan = plan(&members)?;
        let mut sink = ModelSink::new(&plan, self.config.score.device, &paths[0]);
        let total: usize = plan.tensors.iter().map(|t| t.nbytes()).sum();
        events(Event::Progress(Progress::Start {
            what: "bytes averaged".into(),
            total: total as u64,
        }));
        let mut last = 0usize;
        average(&members, &plan, &mut sink, &mut |done| {
            events(Event::Progress(Progress::Advance((done - last) as u64)));
            last = done;
        })?;
        events(Event::Progress(Progress::Finish));
        drop(opened);
        let mut model = sink.into_model();
        let scored = score_model(&mut model, &self.val, &self.config.score, &mut |p| {
            events(Event::Progress(p))
        })?;
        drop(model);
        self.cache.put(
            &key,
            &scored.image.view(),
            &scored.text.view(),
            &scored.score,
        )?;
        self.computed += 1;
        events(Event::Stage(format!(
            "{}: MR {:.2} (R@1 {:.2}, R@5 {:.2}, R@10 {:.2})",
            self.describe(recipe),
            scored.score.mean_recall,
            scored.score.r1,
            scored.score.r5,
            scored.score.r10
        )));
        Ok(scored.score)
    }

    fn write_soup(
        &mut self,
        outcome: &Outcome,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), SoupError> {
        let recipe = &outcome.result;
        let (_, opened) = self.open_members(recipe)?;
        let members = weighted(&opened, recipe);
        let plan = plan(&members)?;
        let record = serde_json::json!({
            "strategy": outcome.strategy.as_str(),
            "members": recipe.weights().iter().map(|&(i, w)| serde_json::json!({
                "name": self.candidates[i].name,
                "file": self.candidates[i].given,
                "weight": w,
            })).collect::<Vec<_>>(),
            "mean_recall": outcome.result_score.mean_recall,
        });
        let output = soup_path(&self.config.out);
        let mut sink = FileSink::new(
            &output,
            vec![("cnclip.soup".to_string(), record.to_string())],
        );
        std::fs::create_dir_all(&self.config.out)
            .map_err(crate::error::io_err(&self.config.out))?;
        let total: usize = plan.tensors.iter().map(|t| t.nbytes()).sum();
        events(Event::Stage(format!(
            "writing {} = {}",
            output.display(),
            self.describe(recipe)
        )));
        events(Event::Progress(Progress::Start {
            what: "bytes written".into(),
            total: total as u64,
        }));
        let mut last = 0usize;
        average(&members, &plan, &mut sink, &mut |done| {
            events(Event::Progress(Progress::Advance((done - last) as u64)));
            last = done;
        })?;
        events(Event::Progress(Progress::Finish));
        Ok(())
    }
}

/// Runs a soup (see [`SoupConfig`]); `events` receives progress.
pub fn run(config: &SoupConfig, events: &mut dyn FnMut(Event)) -> Result<Summary, SoupError> {
    if config.candidates.is_empty() {
        return Err(SoupError::Invalid("no candidates given".into()));
    }
    let candidates = resolve(&config.candidates, config.lora_base.as_deref())?;
    events(Event::Stage(format!(
        "reading the validation split {}",
        config.val_data.display()
    )));
    let val = ValSet::open(&config.val_data, &config.val)?;
    events(Event::Stage(format!(
        "{} queries, {} images; {} candidates; cache {}",
        val.num_queries(),
        val.num_images(),
        candidates.len(),
        config.cache_dir.display()
    )));
    let n = candidates.len();
    let mut runner = Runner {
        config,
        candidates,
        cache: Cache::new(&config.cache_dir),
        val,
        natives: vec![None; n],
        computed: 0,
        cached: 0,
    };
    let mut scores = Vec::with_capacity(n);
    for i in 0..n {
        scores.push(runner.score(&Recipe::single(i), events)?);
    }
    let names: Vec<String> = runner.candidates.iter().map(|c| c.name.clone()).collect();
    events(Event::Stage(format!("{} soup", config.strategy.as_str())));
    let outcome = strategy::run(
        config.strategy,
        &names,
        &scores,
        &config.pairwise,
        |recipe| runner.score(recipe, events),
    )?;
    let output = if config.report_only {
        None
    } else {
        runner.write_soup(&outcome, events)?;
        Some(soup_path(&config.out))
    };
    let files: Vec<String> = runner.candidates.iter().map(|c| c.given.clone()).collect();
    let report = Report::new(&ReportInput {
        names: &names,
        files: &files,
        scores: &scores,
        outcome: &outcome,
        val_data: config.val_data.display().to_string(),
        queries: runner.val.num_queries(),
        images: runner.val.num_images(),
        output,
    });
    let (markdown, json) = report.write(&config.out)?;
    Ok(Summary {
        report,
        markdown,
        json,
        computed: runner.computed,
        cached: runner.cached,
        outcome,
    })
}

/// Where a run in `out` writes its soup.
pub fn soup_path(out: &Path) -> PathBuf {
    out.join("soup.safetensors")
}

/// The default cache of a run in `out`.
pub fn default_cache_dir(out: &Path) -> PathBuf {
    out.join("cache")
}

/// Each opened member with its weight in `recipe` (same order as [`Recipe::members`]).
fn weighted<'a>(opened: &'a [NativeReader], recipe: &Recipe) -> Vec<(&'a NativeReader, f64)> {
    opened
        .iter()
        .zip(recipe.weights())
        .map(|(c, &(_, w))| (c, w))
        .collect()
}
