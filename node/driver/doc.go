// Package driver is gpumesh's exec driver: it runs one rank of a job as a
// child process with the torchrun environment, keeps its stdout and stderr
// in rotated files, stops it with SIGTERM then SIGKILL, records how it
// ended, and finds it again after the daemon restarts. It runs on Linux only
// (proc_linux.go); elsewhere the package builds, so that the gpumesh CLI
// does, New returns ErrUnsupportedOS and SupervisorMain refuses.
//
// # Processes
//
// Every task runs under a supervisor: the gpumesh binary itself, started as
// the hidden command "gpumesh task-supervise" (SupervisorCommand, whose body
// is SupervisorMain), in a session of its own so that it outlives the
// daemon. This is the shape of Nomad's executor:
//
//	gpumesh agent (daemon)
//	  └─ gpumesh task-supervise --dir <alloc>/.gpumesh   (new session; holds the lock)
//	       └─ the task's command                         (own process group; SIGKILL if the supervisor dies)
//	            └─ its children                          (same process group)
//
// The supervisor owns everything that must not depend on the daemon being
// alive: it reads the task's output from pipes and writes the rotated log
// files, runs the kill timer of a stop, kills what is left of the task's
// process group when the task's main process exits, and writes the exit
// status to exit.json. A daemon crash, restart or upgrade loses nothing:
// the task runs on, its logs keep flowing, its stop (if one began) completes,
// its exit status is waiting on disk.
//
// # Allocation directory
//
//	<data dir>/alloc/<job>/<generation>/<rank>/   GPUMESH_ALLOC_DIR; the task's default working directory
//	    logs/stdout.0, stdout.1, ...               rotated output (see Logs); stderr.N likewise
//	    logs/logs.json, logs/stdout.closed         rotation settings; marker that the stream is complete
//	    logs/stdout.0.times, ...                   when each write's bytes landed (ReadLogStamps), pruned with its file
//	    preempt_deadline                           appears on a stop: when SIGKILL comes (GPUMESH_PREEMPT_DEADLINE_FILE)
//	    error.json                                 TORCHELASTIC_ERROR_FILE (written by torch's @record)
//	    .gpumesh/spec.json                         the resolved spec and its hash (written by the driver before start)
//	    .gpumesh/state.json                        supervisor and task PIDs, start times, boot ID (by the supervisor)
//	    .gpumesh/stop.json                         the latest stop request (by the driver, then SIGTERM to the supervisor)
//	    .gpumesh/exit.json                         the ExitResult (by the supervisor; by the driver if the supervisor died)
//	    .gpumesh/supervisor.lock                   flock held by the supervisor for its whole life
//	    .gpumesh/supervisor.log                    the supervisor's own log
//
// Every file is replaced atomically (written under a temporary name, then
// renamed), so any process sees it whole or not at all. Only exit.json is
// also fsynced: the other files describe processes of this boot, which a
// power loss ends anyway, so starts and stops pay no disk flush.
//
// # No orphans, no duplicates
//
// The driver takes the allocation's lock before it starts the supervisor
// and hands the locked descriptor down, so the lock is held without a gap
// for as long as a supervisor lives, and the kernel drops it when the
// supervisor dies however it dies. A second supervisor for the same
// allocation cannot start (it exits with "another supervisor holds ...").
// Start is idempotent for a running task, and refuses an allocation whose
// task already ran: a restart is a new generation. On daemon start, Recover
// walks the allocations: a held lock means a live supervisor, which is then
// checked by PID, start time (/proc/<pid>/stat) and boot ID before the
// driver watches it again through a pidfd (so a reused PID is never
// signalled or waited on); a free lock without exit.json means the
// supervisor died (killed, or the machine rebooted), and the task is
// recorded as lost after the driver kills whatever is left of its process
// group. The task itself gets SIGKILL as its parent-death signal, so it
// never runs on without a supervisor.
//
// # Orphans
//
// A supervisor outlives its daemon on purpose, and a restarted daemon finds
// it through the allocation directory. When that directory is gone for good
// (the data directory was deleted or moved: a killed test run whose
// temporary directory was removed, an operator who wiped the node), no
// daemon can find, stop or reap the task again. So every
// Config.DirCheckInterval (default 2 s) the supervisor checks that
// .gpumesh/supervisor.lock is still the file whose lock it holds. When that
// path is gone, or is another file (the directory was deleted and made
// again), it stops the task the way a plain stop does (SIGTERM to the
// group, SIGKILL after the kill timeout), writes why into the task's stderr
// log (the file it holds open, wherever that is now) and its own log, and
// exits with code 5 without writing anything more into the allocation
// directory by path: no exit.json, deadline file, closed markers or new log
// files, since the path may belong to another task now. A daemon restart
// leaves the directory in place and so never triggers this; an error other
// than "does not exist" (a permission problem) is not taken as a deletion.
//
// A dev cluster's or a test's tasks must not outlive it even when its
// process is killed and its data dir stays (a test binary killed by its
// timeout runs no cleanup). With Config.StopWithDaemon the supervisor is
// also given the daemon's PID and start time, and at the same check stops
// the task once that process has exited, recording the stop and its reason
// in exit.json as a plain stop does.
//
// Under systemd the daemon's unit must say KillMode=process, or a restart
// of the daemon kills every task in its control group (Nomad's unit does
// the same).
//
// # Stopping, and checkpointing before preemption
//
// Handle.Stop (or RequestStop) writes the stop request and sends SIGTERM to
// the supervisor, which then
//
//  1. writes the time SIGKILL will come, in Unix seconds, to the file named
//     by GPUMESH_PREEMPT_DEADLINE_FILE (<alloc dir>/preempt_deadline),
//  2. sends SIGTERM to the task's process group,
//  3. sends SIGKILL to the group at that time if anything is left.
//
// The time is now + the task's kill timeout (default 30 s) for a plain
// stop, or the deadline the caller passes (StopOptions.Deadline): the spot
// interruption drain passes the notice's time minus a margin. An
// environment variable cannot change in a running process, so the
// deadline travels in a file whose path is in the environment from the
// start; the file does not exist until a stop begins. A PyTorch script
// checkpoints like this:
//
//	import os, signal, time
//	stop = False
//	def on_sigterm(signum, frame):
//	    global stop
//	    stop = True
//	signal.signal(signal.SIGTERM, on_sigterm)
//	for step in range(start, steps):
//	    train_step()
//	    if stop:
//	        with open(os.environ["GPUMESH_PREEMPT_DEADLINE_FILE"]) as f:
//	            left = float(f.read()) - time.time()   # seconds until SIGKILL
//	        if left > checkpoint_seconds:
//	            save_checkpoint(step)
//	        break
//
// A task that does not trap SIGTERM simply exits (Python's default is to
// die of it). When a stop is already under way, a new request can only
// bring SIGKILL sooner.
//
// # Logs
//
// Each stream is kept as <stream>.0, <stream>.1, ... in the log directory;
// every file but the newest holds exactly LogConfig.MaxFileBytes, and only
// the newest MaxFiles are kept. A byte's offset in the stream is therefore
// stable, and Logs can start at an offset, at the tail (a negative offset),
// and follow across rotation like "tail -F" until the task has exited
// (the <stream>.closed marker), which is what "gpumesh job logs -f" needs.
//
// # Environment
//
// BuildEnv turns a rank's placement (RankEnv; RankEnvFromPlan fills it from
// a sharding.Plan) into the variables torchrun's elastic agent sets (RANK,
// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE,
// ROLE_RANK, ROLE_WORLD_SIZE, ROLE_NAME, MASTER_ADDR, MASTER_PORT,
// TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS, TORCHELASTIC_RUN_ID,
// TORCHELASTIC_USE_AGENT_STORE=False, TORCHELASTIC_ERROR_FILE,
// TORCH_NCCL_ASYNC_ERROR_HANDLING), CUDA_VISIBLE_DEVICES for the GPUs placed
// (empty for a CPU rank; ranks sharing a GPU under ranks_per_gpu name the
// same one), and GPUMESH_JOB_ID, GPUMESH_GENERATION,
// GPUMESH_RANK, GPUMESH_ADDR, GPUMESH_ALLOC_DIR,
// GPUMESH_PREEMPT_DEADLINE_FILE.
//
// # Use
//
//	d, err := driver.New(driver.Config{DataDir: dataDir, Logger: logger})
//	handles, err := d.Recover(ctx)              // first: tasks of the previous daemon
//	env, err := driver.BuildEnv(rankEnv, os.Environ(), job.Env)
//	h, err := d.Start(ctx, driver.TaskSpec{ID: id, Command: argv, Env: env})
//	<-h.Done(); res, _ := h.Result()            // exit code, signal, lost, ...
//	res, err = h.Stop(ctx, driver.StopOptions{Deadline: notice.Add(-10 * time.Second), Reason: "spot interruption"})
//	r, err := h.Logs(ctx, driver.Stdout, true, 0) // follow
//	d.Shutdown()                                // leaves tasks running
//
// The gpumesh binary must route "gpumesh task-supervise ARGS" to
// os.Exit(driver.SupervisorMain(ARGS)), with flag parsing off.
package driver
