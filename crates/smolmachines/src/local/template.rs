//! Booted templates: `create` as a clone of a frozen, booted machine instead of a cold boot
//! (issue 12).
//!
//! Per set of boot inputs (kernel, initramfs, QEMU, accelerator, cpus, memory, disk size,
//! linger time) the engine keeps one *template*: a machine booted once, then frozen in place
//! (`freeze_in_place`: its device state and RAM kept as files, its VMM ended, phase `Frozen`).
//! A create whose machine is eligible becomes a branch of that base (`branch::make_clone`):
//! the RAM and device state are copied, the base's disk is linked under the new machine's own
//! overlay, the agent gets the new machine's hostname and a reseeded RNG, and the workload is
//! launched as after a boot. Everything else (record, ports, labels, lifetime) is the new
//! machine's, made by `create` as for a cold boot.
//!
//! *Eligible:* no network, no mounts, not detached (the template's agent was booted with
//! those absent, and with the linger time of an attached machine). The others boot cold. An
//! image machine's template boots with that image (its reference and root file system are
//! inputs of the key); templates and pool clones run no workload, each machine its own.
//!
//! *Warm pool:* per template, the engine keeps `SMOL_TEMPLATE_POOL` (default 1,
//! [`LocalBackend::with_template_pool`]) running clones made ahead and warmed by one command;
//! a create takes one over (`local::pool`: the same VMM and agent session, the new machine's
//! identity) and the pool is filled again in the background. With the default size, a
//! process's pool of a template is first filled at its second create of that kind (a process
//! that makes one machine keeps no clone it never uses); an asked-for size, from the first.
//! Branch sources and pool clones themselves are clones made at create.
//! *On* by default; `LocalBackend::with_templates(false)`, or `SMOL_TEMPLATES=0` (when the
//! builder does not say), boots every machine cold. A template that cannot be built or used is
//! logged and the machine boots cold: a template only ever makes a create faster, never makes
//! one fail.
//! *Lifetime:* a template is kept in the engine home across processes
//! (`local::template_store`: a frozen machine with a persistent, ownerless record, hidden from
//! `list`, its key's lock and manifest in `<home>/booted/`): the next process and concurrent
//! ones clone it; one that is unsound (another boot, its RAM file gone, damaged files) is
//! rebuilt; the reaper's GC removes unused ones; [`LocalBackend::drop_templates`] removes them
//! all. The warm pool is this process's.
//! Changed inputs give another key, so another template.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use super::template_store::{self as store, Inputs, KeyLock, Manifest};
use super::*;
use crate::config::{BranchOptions, ExecOptions, ResourceSpec};

/// The label of a template machine (such machines are hidden from `list`).
pub const TEMPLATE_LABEL: &str = "smol.internal/template";

/// The label of a warm pool clone (hidden from `list` too).
pub const POOL_LABEL: &str = "smol.internal/pool";

/// One template build at a time in this process (two creates that both miss wait for one).
static BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The pools being filled now: (engine home, template name).
static FILLING: std::sync::Mutex<std::collections::BTreeSet<(PathBuf, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The most warm clones kept per template.
pub const MAX_POOL: usize = 8;

/// Whether `labels` are those of a template or a pool clone (hidden from `list`, no workload).
pub(super) fn internal(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(TEMPLATE_LABEL) || labels.contains_key(POOL_LABEL)
}

/// Whether `rec` is hidden from `list` (a template or a pool clone).
pub(super) fn hidden(rec: &Record) -> bool {
    internal(&rec.labels)
}

fn file_stamp(path: &Path, h: &mut DefaultHasher) {
    path.hash(h);
    if let Ok(m) = std::fs::metadata(path) {
        m.len().hash(h);
        m.modified().ok().hash(h);
    }
}

/// The boot inputs of a template for `rec` (`qemu`: the VMM's version; `run_dir`: the
/// engine's, where the template's RAM and sockets live).
pub(super) fn inputs(rec: &Record, qemu: &str, run_dir: &Path) -> Inputs {
    Inputs {
        kernel: rec.kernel.clone(),
        initrd: rec.initrd.clone(),
        image: rec
            .image
            .as_ref()
            .map(|i| format!("{} ({})", i.reference, i.fstype)),
        rootfs: rec.image.as_ref().map(|i| i.rootfs.clone()),
        qemu: qemu.to_string(),
        flavor: rec.flavor.clone(),
        accel: rec.accel.clone(),
        cpus: rec.cpus,
        memory_mb: rec.memory_mb,
        storage_gb: rec.storage_gb,
        linger_ms: LINGER.as_millis() as u64,
        run_dir: run_dir.to_path_buf(),
        image_slots: rec.image_slots.len(),
    }
}

/// The template's name (its key) for `rec`'s boot inputs, or `None` when such a machine
/// cannot come from a template.
pub(super) fn template_name(rec: &Record, qemu: &str, run_dir: &Path) -> Option<String> {
    let eligible = !rec.network && rec.mounts.is_empty() && !rec.detach;
    if !eligible || rec.labels.contains_key(TEMPLATE_LABEL) {
        return None;
    }
    let mut h = DefaultHasher::new();
    let i = inputs(rec, qemu, run_dir);
    i.hash(&mut h);
    // a changed file (same path, rebuilt) is another template
    file_stamp(&i.kernel, &mut h);
    file_stamp(&i.initrd, &mut h);
    if let Some(r) = &i.rootfs {
        file_stamp(r, &mut h);
    }
    Some(format!("tpl-{:016x}", h.finish()))
}

/// How many templates this process has built (booted and frozen).
pub fn builds() -> usize {
    BUILDS.load(std::sync::atomic::Ordering::SeqCst)
}

static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl LocalBackend {
    /// The same engine creating eligible machines from booted templates (`on`), or always
    /// booting them cold. Without it, templates are on unless `SMOL_TEMPLATES=0`.
    pub fn with_templates(mut self, on: bool) -> Self {
        self.templates = Some(on);
        self
    }

    /// The same engine keeping `n` warm clones per template (at most [`MAX_POOL`]; 0: none).
    /// Without it, `SMOL_TEMPLATE_POOL` (default 1, first filled at a process's second create
    /// of a kind; an asked-for size, from the first).
    pub fn with_template_pool(mut self, n: usize) -> Self {
        self.pool = Some(n.min(MAX_POOL));
        self
    }

    fn pool_size(&self) -> usize {
        self.pool.unwrap_or_else(|| {
            std::env::var("SMOL_TEMPLATE_POOL")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
                .min(MAX_POOL)
        })
    }

    /// Whether the pool size was asked for (the builder or `SMOL_TEMPLATE_POOL`), not the
    /// default.
    fn pool_asked(&self) -> bool {
        self.pool.is_some() || std::env::var_os("SMOL_TEMPLATE_POOL").is_some()
    }

    pub(super) fn templates_on(&self) -> bool {
        self.templates
            .unwrap_or_else(|| std::env::var("SMOL_TEMPLATES").as_deref() != Ok("0"))
    }

    /// How many warm pool clones this engine holds now, and whether a pool is being filled.
    pub fn warm_clones(&self) -> (usize, bool) {
        let n = self
            .shared
            .templates
            .1
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum();
        let filling = FILLING
            .lock()
            .expect("filling lock")
            .iter()
            .any(|(h, _)| *h == self.home);
        (n, filling)
    }

    /// Waits (up to `within`) until no pool of this engine is being filled; the number of
    /// warm clones then.
    pub async fn settle_pool(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let (n, filling) = self.warm_clones();
            if !filling || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deletes the templates of this engine's home that no create is cloning now, and this
    /// engine's warm pool clones (the next templated create builds a template again).
    pub async fn drop_templates(&self) -> Result<()> {
        let pool: Vec<LocalMachine> = {
            let mut p = self.shared.templates.1.lock().expect("pool lock");
            p.drain().flat_map(|(_, v)| v).collect()
        };
        for m in pool {
            m.destroy().await?;
        }
        self.gc_templates(store::Policy {
            max_age: Duration::ZERO,
            max: 0,
        })
        .await?;
        Ok(())
    }

    /// Removes the templates of this engine's home that `policy` does not keep, never one a
    /// create is cloning now (`local::template_store`; the reaper runs it with
    /// [`store::Policy::from_env`]). Returns how many were removed.
    pub async fn gc_templates(&self, policy: store::Policy) -> Result<usize> {
        let db = self.db().await?;
        let (run, home, engine_home) = (
            self.machines_dir(),
            self.home.join("machines"),
            self.home.clone(),
        );
        db.call(move |db| {
            let dirs = reaper::Dirs {
                run: &run,
                home: &home,
            };
            store::gc(db, &dirs, &engine_home, policy)
        })
        .await
    }

    /// Why the kept template `name` cannot be used (checked under its lock), or its record and
    /// manifest.
    async fn check_template(&self, name: &str) -> std::result::Result<(Record, Manifest), String> {
        let m = store::read_manifest(&self.home, name)?;
        if m.key != name {
            return Err(format!("its manifest is of {:?}", m.key));
        }
        if m.boot_id != store::boot_id() {
            return Err("it was built under another boot".into());
        }
        let db = self.db().await.map_err(|e| e.to_string())?;
        let n = name.to_string();
        let rec = db
            .call(move |db| db.get(&n))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("its machine record is missing")?;
        if !rec.frozen {
            return Err("its machine is not frozen".into());
        }
        let size = |p: PathBuf| {
            std::fs::metadata(&p)
                .map(|m| m.len())
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let run = self.machine_run_dir(name);
        let ram = machine::base_ram_at(
            &self.machine_home_dir(name),
            &ram::dir(&self.machines_dir(), name),
        );
        let (r, st) = (size(ram)?, size(run.join(machine::BASE_STATE))?);
        if (r, st) != (m.ram_bytes, m.state_bytes) {
            return Err(format!(
                "its files are damaged: RAM {r} bytes (built {}), device state {st} bytes (built {})",
                m.ram_bytes, m.state_bytes
            ));
        }
        size(self.machine_home_dir(name).join("disk.qcow2"))?;
        Ok((rec, m))
    }

    /// A handle of the kept template `rec` (phase `Frozen`, no VM), holding `lock`.
    async fn template_handle(&self, rec: Record, lock: KeyLock) -> Result<LocalMachine> {
        let db = self.db().await?;
        Ok(LocalMachine::new(machine::Parts {
            spec: self.spec_for(&rec),
            vmm: self.vmm.clone(),
            db,
            passt: self.passt.clone().unwrap_or_else(net::passt),
            home_dir: self.machine_home_dir(&rec.name),
            record: rec,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            owned: false,
            lock: lock.0,
            engine: self.shared.clone(),
            phase: Phase::Frozen,
        }))
    }

    /// The frozen template named `name` for a machine like `rec`, with its shared lock held
    /// (by the handle): the one kept in the engine home when it is sound, else built now (a
    /// cold boot, then a freeze) by this process, while others wait. `None` (logged): the
    /// caller boots cold.
    pub(super) async fn template(
        &self,
        name: &str,
        rec: &Record,
        qemu: &str,
        ready_timeout: Option<Duration>,
    ) -> Option<LocalMachine> {
        match self.kept_or_built(name, rec, qemu, ready_timeout).await {
            Ok(m) => {
                self.shared
                    .templates
                    .0
                    .lock()
                    .expect("templates lock")
                    .insert(name.to_string());
                Some(m)
            }
            Err(e) => {
                tracing::warn!(template = name, error = %e, "no template; booting cold");
                None
            }
        }
    }

    async fn kept_or_built(
        &self,
        name: &str,
        rec: &Record,
        qemu: &str,
        ready_timeout: Option<Duration>,
    ) -> std::result::Result<LocalMachine, String> {
        let path = store::lock_path(&self.home, name);
        for _ in 0..3 {
            let shared = store::lock(&path, false, store::LOCK_WAIT).await?;
            match self.check_template(name).await {
                Ok((r, _)) => {
                    shared.touch();
                    tracing::debug!(template = name, "using the kept template");
                    return self
                        .template_handle(r, shared)
                        .await
                        .map_err(|e| e.to_string());
                }
                Err(why) => tracing::info!(template = name, reason = %why, "template to build"),
            }
            drop(shared);
            // one build per process at a time, one per key across processes
            let _one = BUILD.lock().await;
            let exclusive = store::lock(&path, true, store::LOCK_WAIT).await?;
            if self.check_template(name).await.is_ok() {
                continue; // built by another process meanwhile
            }
            self.build_template(name, rec, qemu, ready_timeout).await?;
            drop(exclusive);
        }
        Err("the template was removed as often as it was built".into())
    }

    /// Builds the template `name` (the caller holds its exclusive lock): what is left of an
    /// older one is removed, a machine is booted and frozen, made persistent and ownerless,
    /// and its manifest written.
    async fn build_template(
        &self,
        name: &str,
        rec: &Record,
        qemu: &str,
        ready_timeout: Option<Duration>,
    ) -> std::result::Result<(), String> {
        let db = self.db().await.map_err(|e| e.to_string())?;
        let (run, home, engine_home, key) = (
            self.machines_dir(),
            self.home.join("machines"),
            self.home.clone(),
            name.to_string(),
        );
        db.call(move |db| {
            let dirs = reaper::Dirs {
                run: &run,
                home: &home,
            };
            // (its lock file stays: the caller holds it)
            store::remove(db, &dirs, &engine_home, &key, false)
        })
        .await
        .map_err(|e| format!("removing the old template: {e}"))?;
        let t0 = Instant::now();
        let config = MachineConfig {
            name: Some(name.to_string()),
            branchable: Some(true),
            resources: ResourceSpec {
                cpus: Some(rec.cpus),
                memory_mb: Some(rec.memory_mb),
                storage_gb: Some(rec.storage_gb),
                ..Default::default()
            },
            image: rec.image.as_ref().map(|i| i.reference.clone()),
            labels: [(TEMPLATE_LABEL.to_string(), "1".to_string())].into(),
            // the create's own bound: a template that cannot boot costs it no more than that
            ready_timeout,
            ..Default::default()
        };
        // (boxed: create_machine is what asked for the template)
        let m = Box::pin(self.create_machine(config))
            .await
            .map_err(|e| e.to_string())?;
        let kept = async {
            m.freeze_in_place().await?;
            m.keep_as_template().await
        }
        .await;
        let (ram_bytes, state_bytes) = match kept {
            Ok(sizes) => sizes,
            Err(e) => {
                if let Err(d) = m.destroy().await {
                    tracing::warn!(template = name, error = %d, "cannot remove a template that failed to freeze");
                }
                return Err(e.to_string());
            }
        };
        let manifest = Manifest {
            key: name.to_string(),
            inputs: inputs(rec, qemu, &self.run_dir),
            boot_id: store::boot_id(),
            build_id: format!("{:016x}", rand::random::<u64>()),
            builder_pid: std::process::id(),
            built_unix: now_unix(),
            ram_bytes,
            state_bytes,
        };
        store::write_manifest(&self.home, &manifest)?;
        BUILDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            template = name,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "template booted and frozen, kept in the engine home"
        );
        Ok(())
    }

    /// Starts `machine` (just created, phase `Creating`, no disk yet) from `template`: a warm
    /// pool clone handed over when one is ready (`local::pool`), else a clone made now; the
    /// pool is filled again in the background. Pool clones themselves and branch sources
    /// (whose RAM must be a file of their own) are always clones made now.
    pub(super) async fn start_templated(
        &self,
        template: &LocalMachine,
        machine: &LocalMachine,
    ) -> Result<()> {
        let rec = machine.record();
        if rec.labels.contains_key(POOL_LABEL) || rec.branchable || self.pool_size() == 0 {
            return self.clone_template(template, machine).await;
        }
        let tname = template.name().to_string();
        let (warm, again) = {
            let mut p = self.shared.templates.1.lock().expect("pool lock");
            let again = p.contains_key(&tname);
            (p.entry(tname.clone()).or_default().pop(), again)
        };
        // by default a process keeps a pool once it makes a second machine of the kind: one
        // that makes a single machine (`smol run`) pays no VMM it never uses; an asked-for
        // pool is filled from the first create
        if again || self.pool_asked() {
            self.refill(template);
        }
        if let Some(p) = warm {
            let t0 = Instant::now();
            match p.hand_over(machine).await {
                Ok(()) => {
                    tracing::debug!(
                        template = %tname,
                        pool = %p.name(),
                        ms = t0.elapsed().as_secs_f64() * 1e3,
                        "created from a warm pool clone"
                    );
                    return machine.launch_workload().await;
                }
                Err(e) => {
                    if let Err(d) = p.destroy().await {
                        tracing::debug!(pool = %p.name(), error = %d, "pool clone cleanup");
                    }
                    // how far the hand-over got decides what `machine` holds: the caller
                    // cleans it up and boots cold
                    return Err(e);
                }
            }
        }
        self.clone_template(template, machine).await
    }

    /// [`Self::start_from_template`]; a failure discards the template (the next create
    /// rebuilds it: a template only ever makes a create faster), except a refusal for lack of
    /// host memory.
    async fn clone_template(&self, template: &LocalMachine, machine: &LocalMachine) -> Result<()> {
        let r = self.start_from_template(template, machine).await;
        // a host without room for the clone (local::admission) says nothing of the template
        let no_room = matches!(r, Err(Error::InsufficientMemory { .. }));
        if let (Err(e), false) = (&r, no_room) {
            store::discard(
                &self.home,
                template.name(),
                &format!("a clone of it failed: {e}"),
            );
        }
        r
    }

    /// Fills `template`'s pool up to its size in the background, one clone at a time, each
    /// warmed by one command (so the guest code a create and a first exec run is translated).
    fn refill(&self, template: &LocalMachine) {
        let tname = template.name().to_string();
        let key = (self.home.clone(), tname.clone());
        if !FILLING.lock().expect("filling lock").insert(key.clone()) {
            return;
        }
        let me = self.clone().with_templates(true);
        let trec = template.record();
        tokio::spawn(async move {
            loop {
                let have = me
                    .shared
                    .templates
                    .1
                    .lock()
                    .expect("pool lock")
                    .get(&tname)
                    .map_or(0, |v| v.len());
                if have >= me.pool_size() {
                    break;
                }
                let config = MachineConfig {
                    name: Some(format!("pool-{:012x}", rand::random::<u64>() >> 16)),
                    resources: ResourceSpec {
                        cpus: Some(trec.cpus),
                        memory_mb: Some(trec.memory_mb),
                        storage_gb: Some(trec.storage_gb),
                        ..Default::default()
                    },
                    image: trec.image.as_ref().map(|i| i.reference.clone()),
                    labels: [(POOL_LABEL.to_string(), tname.clone())].into(),
                    ..Default::default()
                };
                let made = async {
                    let m = me.create_machine(config).await?;
                    m.exec(&["true".to_string()], &ExecOptions::default())
                        .await?;
                    Ok::<_, Error>(m)
                }
                .await;
                match made {
                    Ok(m) => me
                        .shared
                        .templates
                        .1
                        .lock()
                        .expect("pool lock")
                        .entry(tname.clone())
                        .or_default()
                        .push(m),
                    Err(e) => {
                        tracing::warn!(template = %tname, error = %e, "no warm pool clone");
                        break;
                    }
                }
            }
            FILLING.lock().expect("filling lock").remove(&key);
        });
    }

    /// Starts `machine` (just created, phase `Creating`, no disk yet) as a clone of `template`:
    /// its disk an overlay over the template's, its RAM and device state the template's, its
    /// own identity; then its workload, as after a boot.
    pub(super) async fn start_from_template(
        &self,
        template: &LocalMachine,
        machine: &LocalMachine,
    ) -> Result<()> {
        let ram = template.base_ram();
        let opts = BranchOptions {
            branchable: machine.record().branchable,
            ..Default::default()
        };
        let report = template.make_clone(machine, &ram, &opts).await?;
        tracing::debug!(
            template = %template.inner.name,
            ram_mib = report.ram_bytes >> 20,
            "created from a template"
        );
        machine.launch_workload().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            kernel: "/nonexistent/vmlinux".into(),
            initrd: "/nonexistent/initrd".into(),
            ..Record::for_test("m")
        }
    }

    #[test]
    fn the_key_follows_the_boot_inputs_and_ineligible_machines_have_none() {
        let base = rec();
        let run = Path::new("/run/smol");
        let name = template_name(&base, "QEMU 7.2", run).expect("a plain machine is eligible");
        assert!(name.starts_with("tpl-") && name.len() == 20, "{name}");
        crate::config::validate_name(&name).expect("a valid machine name");
        // the machine's own name is not an input
        let mut other = base.clone();
        other.name = "n".into();
        assert_eq!(template_name(&other, "QEMU 7.2", run), Some(name.clone()));
        let mut m = base.clone();
        m.memory_mb += 1;
        assert_ne!(template_name(&m, "QEMU 7.2", run), Some(name.clone()));
        assert_ne!(template_name(&base, "QEMU 8.0", run), Some(name.clone()));
        // another run directory (another tmpfs for the RAM) is another template
        assert_ne!(
            template_name(&base, "QEMU 7.2", Path::new("/tmp/other")),
            Some(name.clone())
        );
        let mut k = base.clone();
        k.initrd = "/nonexistent/other".into();
        assert_ne!(template_name(&k, "QEMU 7.2", run), Some(name.clone()));
        // an image machine has a template of its own image
        let image = |reference: &str| record::ImageRecord {
            reference: reference.into(),
            rootfs: format!("/nonexistent/{reference}.erofs").into(),
            fstype: "erofs".into(),
            env: Default::default(),
            workdir: None,
        };
        let mut i1 = base.clone();
        i1.image = Some(image("alpine"));
        let mut i2 = base.clone();
        i2.image = Some(image("busybox"));
        let (n1, n2) = (
            template_name(&i1, "QEMU 7.2", run),
            template_name(&i2, "QEMU 7.2", run),
        );
        assert!(n1.is_some() && n2.is_some());
        assert_ne!(n1, n2);
        assert_ne!(n1, Some(name));
        for change in [
            |r: &mut Record| r.network = true,
            |r: &mut Record| r.detach = true,
            |r: &mut Record| {
                r.labels.insert(TEMPLATE_LABEL.into(), "1".into());
            },
        ] {
            let mut r = base.clone();
            change(&mut r);
            assert_eq!(template_name(&r, "QEMU 7.2", run), None);
        }
    }
}
