// Command compose-config loads a Compose project with Docker Compose's own loader (compose-go) and
// prints it resolved, as `docker compose config --format json` does, without a Docker engine.
//
//	compose-config [-os-env] [-env KEY=VALUE]... [-format json|yaml] [-environment] [PROJECT_DIR]
//
// The project directory (default ".") is where the compose file is looked up under its default
// names and where `.env` is read. Variables are resolved in Compose's order: the shell environment
// wins over `.env`. By default the shell environment is only what -env gives, so a test sees the
// same result on every machine; -os-env adds this process's environment, as `docker compose` does.
// -environment prints the variables interpolation used instead (as `docker compose config
// --environment`), as a JSON object. On a loader error the message goes to stderr and the exit status
// is 1 (2 for bad usage); Compose's warnings go to stderr too.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/consts"
	"github.com/sirupsen/logrus"
)

// plainLog prints the loader's warnings as one readable line each, without logrus's key=value quoting.
type plainLog struct{}

func (plainLog) Format(entry *logrus.Entry) ([]byte, error) {
	return []byte(entry.Level.String() + ": " + entry.Message + "\n"), nil
}

type envFlag []string

func (e *envFlag) String() string { return strings.Join(*e, " ") }

func (e *envFlag) Set(value string) error {
	if !strings.Contains(value, "=") {
		return fmt.Errorf("%q is not KEY=VALUE", value)
	}
	*e = append(*e, value)
	return nil
}

func main() {
	var env envFlag
	flag.Var(&env, "env", "a `KEY=VALUE` of the shell environment, which wins over .env (repeatable)")
	osEnv := flag.Bool("os-env", false, "also use this process's environment, as docker compose does")
	format := flag.String("format", "json", "output format: json or yaml")
	environment := flag.Bool("environment", false, "print the interpolation environment (JSON) instead of the project")
	flag.Parse()
	logrus.SetFormatter(plainLog{})
	if flag.NArg() > 1 || (*format != "json" && *format != "yaml") {
		fmt.Fprintln(os.Stderr, "usage: compose-config [flags] [PROJECT_DIR]; -format is json or yaml")
		flag.Usage()
		os.Exit(2)
	}
	projectDir := "."
	if flag.NArg() == 1 {
		projectDir = flag.Arg(0)
	}

	out, err := load(context.Background(), projectDir, env, *osEnv, *format, *environment)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}

func load(ctx context.Context, projectDir string, env []string, osEnv bool, format string, environment bool) ([]byte, error) {
	if !osEnv {
		// compose-go reads this one switch from the real environment, not from the options: keep the
		// result independent of the caller's shell unless -env sets it.
		os.Unsetenv(consts.ComposeDisableDefaultEnvFile)
		for _, kv := range env {
			if key, value, _ := strings.Cut(kv, "="); key == consts.ComposeDisableDefaultEnvFile {
				os.Setenv(key, value)
			}
		}
	}

	// The order is the precedence: a variable already set is never replaced by a later source.
	fns := []cli.ProjectOptionsFn{cli.WithWorkingDirectory(projectDir), cli.WithEnv(env)}
	if osEnv {
		fns = append(fns, cli.WithOsEnv)
	}
	fns = append(fns,
		// .env beside the compose file, unless COMPOSE_DISABLE_ENV_FILE says not to.
		cli.WithEnvFiles(),
		cli.WithDotEnv,
		// COMPOSE_FILE, else compose.yaml, docker-compose.yml, ... (and an override file beside it)
		// found from the project directory upwards.
		cli.WithConfigFileEnv,
		cli.WithDefaultConfigPath,
		// COMPOSE_PROFILES.
		cli.WithDefaultProfiles(),
		// What `docker compose config` turns on: the loader's full validation, paths made absolute,
		// env_file read into `environment`. The project name comes, as in Compose, from
		// COMPOSE_PROJECT_NAME, else `name:`, else the directory's name.
		cli.WithInterpolation(true),
		cli.WithNormalization(true),
		cli.WithConsistency(true),
		cli.WithResolvedPaths(true),
		cli.WithDiscardEnvFile,
	)
	options, err := cli.NewProjectOptions(nil, fns...)
	if err != nil {
		return nil, err
	}
	project, err := options.LoadProject(ctx)
	if err != nil {
		return nil, err
	}
	var out []byte
	switch {
	case environment:
		out, err = json.MarshalIndent(project.Environment, "", "  ")
	case format == "yaml":
		return project.MarshalYAML()
	default:
		out, err = project.MarshalJSON()
	}
	return append(out, '\n'), err
}
