@echo off
rem One-click local launch on Windows: the API, then the web UI; Ctrl+C stops both.
rem Reads MODEL_PATH (checkpoint folder) and CUDA_VISIBLE_DEVICES (e.g. 0 or 0,1) from the environment:
rem   set MODEL_PATH=C:\models\TeleChat-7B
rem   set CUDA_VISIBLE_DEVICES=0
rem   deploy.bat [--api-port 8070] [--web-port 8501] [other deploy.py flags; deploy.bat --help lists them]
rem   deploy.bat --backend vllm --tensor-parallel-size 2   (vLLM backend: Linux/WSL only, see README)
setlocal
set "HERE=%~dp0"
if defined MODEL_PATH echo model: %MODEL_PATH%
if defined CUDA_VISIBLE_DEVICES echo GPUs: %CUDA_VISIBLE_DEVICES%
if exist "%HERE%.venv\Scripts\python.exe" goto venv
where py >nul 2>nul
if %ERRORLEVEL%==0 goto launcher
python "%HERE%deploy.py" %*
exit /b %ERRORLEVEL%
:venv
"%HERE%.venv\Scripts\python.exe" "%HERE%deploy.py" %*
exit /b %ERRORLEVEL%
:launcher
py -3 "%HERE%deploy.py" %*
exit /b %ERRORLEVEL%
