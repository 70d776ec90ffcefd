package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/internal/bytesize"
	"github.com/gpumesh/gpumesh/node"
	"github.com/gpumesh/gpumesh/node/driver"
)

func init() { registerCommand(newCheckpointCommand) }

// Environment variables the agent sets in exec tasks of a job with a
// checkpoint block, read here as flag defaults (spelt once, in node and
// node/driver).
const (
	envCheckpointURI  = node.EnvCheckpointURI
	envCheckpointKeep = node.EnvCheckpointKeep
	envS3Endpoint     = node.EnvS3Endpoint
	envJobID          = driver.EnvJobID
	envGeneration     = driver.EnvGeneration
	envJobName        = node.EnvJobName
	envResumeFrom     = node.EnvCheckpointResumeFrom
)

// checkpointOwner is the job a rank running these commands belongs to
// (nothing outside a job: then no check is made).
func checkpointOwner() checkpoint.Owner {
	return checkpoint.Owner{Name: os.Getenv(envJobName), ID: os.Getenv(envJobID), ResumeFrom: os.Getenv(envResumeFrom)}
}

// newestOwned is the newest complete checkpoint, refused with
// checkpoint.ErrOtherJob when another job wrote it (a warning on stderr
// when it names no job), as the agent does for its ranks.
func newestOwned(ctx context.Context, c *checkpoint.Checkpoints, uri string, stderr io.Writer) (checkpoint.Manifest, error) {
	m, err := c.Latest(ctx)
	if err != nil {
		return m, err
	}
	o := checkpointOwner()
	v, err := o.Check(m)
	if err != nil {
		return checkpoint.Manifest{}, fmt.Errorf("--uri %s: %w", uri, err)
	}
	if v == checkpoint.Unowned && o.Name != "" {
		fmt.Fprintf(stderr, "warning: resuming from the checkpoint of step %d under %s, which names no job (written before job names were recorded, or outside a job)\n", m.Step, uri)
	}
	return m, nil
}

type checkpointFlags struct {
	uri, endpoint, region string
	keep                  int
	json                  bool
}

func (f *checkpointFlags) register(cmd *cobra.Command) {
	keep, _ := strconv.Atoi(os.Getenv(envCheckpointKeep))
	cmd.PersistentFlags().StringVar(&f.uri, "uri", os.Getenv(envCheckpointURI), "where checkpoints live: s3://bucket/prefix or file:///dir (default $"+envCheckpointURI+", set in a job with a checkpoint block)")
	cmd.PersistentFlags().IntVar(&f.keep, "keep", keep, "complete checkpoints kept after a commit (default $"+envCheckpointKeep+", else 3)")
	cmd.PersistentFlags().StringVar(&f.endpoint, "s3-endpoint", os.Getenv(envS3Endpoint), "S3 endpoint URL for S3-compatible stores or VPC endpoints, path-style (default $"+envS3Endpoint+"; empty: AWS)")
	cmd.PersistentFlags().StringVar(&f.region, "region", "", "the bucket's region (default: the AWS SDK's, from AWS_REGION or the profile)")
}

func (f *checkpointFlags) open(ctx context.Context) (*checkpoint.Checkpoints, error) {
	if f.uri == "" {
		return nil, fmt.Errorf("no checkpoint location: pass --uri s3://bucket/prefix or file:///dir (inside a job with a checkpoint block, $%s is set)", envCheckpointURI)
	}
	st, err := checkpoint.Open(ctx, f.uri, checkpoint.S3Config{Endpoint: f.endpoint, Region: f.region})
	if err != nil {
		return nil, err
	}
	return checkpoint.New(st, checkpoint.Config{Keep: f.keep})
}

func newCheckpointCommand() *cobra.Command {
	f := &checkpointFlags{}
	cmd := &cobra.Command{
		Use:   "checkpoint",
		Short: "List, save and fetch training checkpoints (what python/gpumesh/checkpoint.py runs)",
		Long: `Checkpoints of a job live under one URI (the job spec's checkpoint.uri):

  step-<step>/part-<rank>     the state one rank saved (rank 0 only, or every rank's shard)
  step-<step>/MANIFEST.json   written last: a checkpoint exists once its manifest does

put uploads one part, commit writes the manifest once every part is there
and prunes to --keep, latest and get find and fetch the newest complete
checkpoint (a write that died before its commit is never used). Training
scripts call these through gpumesh.checkpoint; people use list.

Inside a job ($GPUMESH_JOB_NAME set), commit records the job's name in the
manifest, and latest and get refuse a newest checkpoint that a job of
another name wrote, unless $GPUMESH_CHECKPOINT_RESUME_FROM (the job's
checkpoint.resume_from) names it; one that names no job is used with a
warning.`,
		Example: `  gpumesh checkpoint list --uri s3://my-bucket/runs/llama
  gpumesh checkpoint put --step 1200 --rank 0 state.pt > part-0.json
  gpumesh checkpoint commit --step 1200 --world 1 --parts "[$(cat part-0.json)]"
  gpumesh checkpoint get --rank 0 restored.pt`,
	}
	f.register(cmd)
	cmd.AddCommand(newCheckpointListCommand(f), newCheckpointPutCommand(f), newCheckpointCommitCommand(f),
		newCheckpointLatestCommand(f), newCheckpointGetCommand(f))
	return cmd
}

func newCheckpointPutCommand(f *checkpointFlags) *cobra.Command {
	var step int64
	var rank int
	cmd := &cobra.Command{
		Use:     "put FILE",
		Short:   "Upload one rank's part of a checkpoint; prints the part as JSON for commit",
		Example: "  gpumesh checkpoint put --uri file:///shared/ckpt --step 120 --rank 1 state-1.pt",
		Args:    oneArg(""),
		RunE: f.withStore(func(ctx context.Context, c *checkpoint.Checkpoints, cmd *cobra.Command, args []string) error {
			file, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer file.Close()
			p, err := c.PutPart(ctx, step, rank, file)
			if err != nil {
				return err
			}
			return json.NewEncoder(cmd.OutOrStdout()).Encode(p)
		}),
	}
	cmd.Flags().Int64Var(&step, "step", -1, "the training step the state belongs to (required)")
	cmd.Flags().IntVar(&rank, "rank", 0, "the rank whose part this is")
	_ = cmd.MarkFlagRequired("step")
	return cmd
}

func newCheckpointCommitCommand(f *checkpointFlags) *cobra.Command {
	var step int64
	var world int
	var parts string
	var meta map[string]string
	cmd := &cobra.Command{
		Use:   "commit",
		Short: "Make a checkpoint visible once all its parts are uploaded, then prune to --keep",
		Example: `  gpumesh checkpoint put --uri s3://my-bucket/runs/llama --step 120 --rank 0 state-0.pt > part-0.json
  gpumesh checkpoint put --uri s3://my-bucket/runs/llama --step 120 --rank 1 state-1.pt > part-1.json
  gpumesh checkpoint commit --uri s3://my-bucket/runs/llama --step 120 --world 2 \
      --parts "[$(cat part-0.json),$(cat part-1.json)]" --meta epoch=3`,
		Args: cobra.NoArgs,
		RunE: f.withStore(func(ctx context.Context, c *checkpoint.Checkpoints, cmd *cobra.Command, args []string) error {
			m := checkpoint.Manifest{Step: step, WorldSize: world, Job: os.Getenv(envJobID), JobName: os.Getenv(envJobName), Meta: meta}
			m.Generation, _ = strconv.ParseUint(os.Getenv(envGeneration), 10, 64)
			if err := json.Unmarshal([]byte(parts), &m.Parts); err != nil {
				return fmt.Errorf("--parts: not a JSON list of parts (what put prints): %v", err)
			}
			return c.Commit(ctx, m)
		}),
	}
	cmd.Flags().Int64Var(&step, "step", -1, "the training step (required)")
	cmd.Flags().IntVar(&world, "world", 1, "the job's world size when it saved")
	cmd.Flags().StringVar(&parts, "parts", "", `the parts, as a JSON list of what put printed: [{"rank":0,"size":N,"crc32c":["..."]}] (required)`)
	cmd.Flags().StringToStringVar(&meta, "meta", nil, "small `KEY=VALUE` data kept in the manifest (e.g. epoch=3)")
	_ = cmd.MarkFlagRequired("step")
	_ = cmd.MarkFlagRequired("parts")
	return cmd
}

// latestJSON is what latest prints: found false on a fresh job.
type latestJSON struct {
	Found    bool                 `json:"found"`
	Manifest *checkpoint.Manifest `json:"manifest,omitempty"`
}

func newCheckpointLatestCommand(f *checkpointFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "latest",
		Short:   `Print the newest complete checkpoint's manifest as JSON ({"found": false} if there is none)`,
		Example: "  gpumesh checkpoint latest --uri s3://my-bucket/runs/llama",
		Args:    cobra.NoArgs,
		RunE: f.withStore(func(ctx context.Context, c *checkpoint.Checkpoints, cmd *cobra.Command, args []string) error {
			m, err := newestOwned(ctx, c, f.uri, cmd.ErrOrStderr())
			out := latestJSON{}
			switch {
			case errors.Is(err, checkpoint.ErrNoCheckpoint):
			case err != nil:
				return err
			default:
				out = latestJSON{Found: true, Manifest: &m}
			}
			return json.NewEncoder(cmd.OutOrStdout()).Encode(out)
		}),
	}
}

func newCheckpointGetCommand(f *checkpointFlags) *cobra.Command {
	var step int64
	var rank int
	cmd := &cobra.Command{
		Use:     "get FILE",
		Short:   "Download a rank's part of the newest (or --step) checkpoint into FILE, checking its CRC32C",
		Example: "  gpumesh checkpoint get --uri file:///shared/ckpt --rank 0 state-0.pt\n  gpumesh checkpoint get --uri file:///shared/ckpt --step 120 --rank 0 state-0.pt",
		Args:    oneArg(""),
		RunE: f.withStore(func(ctx context.Context, c *checkpoint.Checkpoints, cmd *cobra.Command, args []string) error {
			var m checkpoint.Manifest
			var err error
			if step >= 0 {
				if m, err = c.Manifest(ctx, step); errors.Is(err, checkpoint.ErrNotFound) {
					return fmt.Errorf("no complete checkpoint of step %d under %s (`gpumesh checkpoint list --uri %s` lists those there): %w", step, f.uri, f.uri, err)
				}
			} else {
				m, err = newestOwned(ctx, c, f.uri, cmd.ErrOrStderr())
			}
			if err != nil {
				return err
			}
			return downloadFile(ctx, c, m, rank, args[0])
		}),
	}
	cmd.Flags().Int64Var(&step, "step", -1, "the step to fetch; -1 fetches the newest complete checkpoint")
	cmd.Flags().IntVar(&rank, "rank", 0, "whose part to fetch")
	return cmd
}

// withStore is a subcommand's RunE that opens the --uri store first.
func (f *checkpointFlags) withStore(run func(ctx context.Context, c *checkpoint.Checkpoints, cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		c, err := f.open(cmd.Context())
		if err != nil {
			return err
		}
		return run(cmd.Context(), c, cmd, args)
	}
}

// downloadFile fetches a part into a temporary file beside path and renames
// it into place, so path never holds a partial download.
func downloadFile(ctx context.Context, c *checkpoint.Checkpoints, m checkpoint.Manifest, rank int, path string) error {
	tmp := path + ".partial"
	file, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	if err := c.GetPart(ctx, m, rank, file); err != nil {
		file.Close()
		return err
	}
	if err := file.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func newCheckpointListCommand(f *checkpointFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "list",
		Short:   "List the complete checkpoints, newest last",
		Example: "  gpumesh checkpoint list --uri s3://my-bucket/runs/llama",
		Args:    cobra.NoArgs,
		RunE: f.withStore(func(ctx context.Context, c *checkpoint.Checkpoints, cmd *cobra.Command, args []string) error {
			ms, err := c.List(ctx)
			if err != nil {
				return err
			}
			if f.json {
				if ms == nil {
					ms = []checkpoint.Manifest{}
				}
				return json.NewEncoder(cmd.OutOrStdout()).Encode(ms)
			}
			if len(ms) == 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "no complete checkpoint under %s\n", f.uri)
				return nil
			}
			return printCheckpoints(cmd.OutOrStdout(), ms)
		}),
	}
	cmd.Flags().BoolVar(&f.json, "json", false, "print the manifests as JSON")
	return cmd
}

func printCheckpoints(w io.Writer, ms []checkpoint.Manifest) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tWORLD\tPARTS\tSIZE\tSAVED\tJOB")
	for _, m := range ms {
		job := m.Job
		if job != "" {
			job = fmt.Sprintf("%s gen %d", job, m.Generation)
		}
		if m.JobName != "" {
			job = fmt.Sprintf("%s (%s)", m.JobName, job)
		}
		fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%s\t%s\n", m.Step, m.WorldSize, len(m.Parts), bytesize.Format(m.Size()), m.Time.Local().Format(time.DateTime), strings.TrimSpace(job))
	}
	return tw.Flush()
}
